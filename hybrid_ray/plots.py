"""Figures of simulated runs: per-replica Gantt charts, batch occupancy and replica finish times.

Meant to show at a glance where a policy loses time against the lower bound: replicas that
finish early and sit idle while another is still working, and prefill iterations that stall the
decoding batch.

matplotlib is an optional dependency (``pip install 'hybrid-ray[plot]'``); it is imported only
when a figure is drawn. Figures are rendered with the Agg backend through the object-oriented
API (``matplotlib.figure.Figure``), so ``pyplot``'s global state and the user's interactive
backend are never touched.

All times on the figures are seconds since the run's first request arrival, the origin
:func:`hybrid_ray.metrics.summarize` measures the makespan from.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import HybridRayError
from .replica import DECODE, MIXED, PREFILL

if TYPE_CHECKING:                                    # pragma: no cover
    from .metrics import Summary
    from .simulator import RunRecord

# Iteration kinds (Paul Tol's colour-blind-safe "vibrant" / "bright" palettes).
KIND_COLORS = {
    DECODE: "#4477AA",      # blue
    PREFILL: "#EE7733",     # orange
    MIXED: "#AA3377",       # purple
}
KIND_LABELS = {
    DECODE: "decode",
    PREFILL: "prefill only (decodes stalled)",
    MIXED: "mixed (prefill chunk + decode)",
}
# One colour per run in the line / dot figures (run 0, run 1, ...).
RUN_COLORS = ["#CC3311", "#0077BB", "#009988", "#EE3377", "#33BBEE", "#BBBBBB", "#000000"]
MAKESPAN_COLOR = "#111111"
BOUND_COLOR = "#228833"     # green

WIDTH_IN = 12.0
DPI = 120
FONT_SIZE = 11
MIN_BAR_PX = 1.0            # short iterations are widened to this many pixels so they stay visible


def _matplotlib():
    """Import matplotlib lazily; return (Figure, FigureCanvasAgg, Patch, Line2D)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as e:
        raise HybridRayError(
            "plotting needs matplotlib, which is not installed: pip install 'hybrid-ray[plot]'"
        ) from e
    return Figure, FigureCanvasAgg, Patch, Line2D


def _new_figure(height_in: float):
    Figure, FigureCanvasAgg, _, _ = _matplotlib()
    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _style(ax) -> None:
    ax.tick_params(labelsize=FONT_SIZE - 1)
    ax.xaxis.label.set_size(FONT_SIZE)
    ax.yaxis.label.set_size(FONT_SIZE)
    ax.title.set_size(FONT_SIZE + 1)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _origin(rec: RunRecord) -> float:
    """The run's first arrival (metrics.summarize measures the makespan from it)."""
    return min((s.req.arrival_s for s in rec.sequences), default=0.0)


def _makespan(rec: RunRecord) -> float:
    """Makespan as summarize() defines it: first arrival to last finish."""
    return rec.makespan_s - _origin(rec) if rec.sequences else 0.0


def _busy_utilization(rec: RunRecord) -> float:
    span = _makespan(rec)
    if span <= 0 or not rec.replicas:
        return 0.0
    return sum(r.busy_s for r in rec.replicas) / (len(rec.replicas) * span)


def _segments(records, t0: float, eps: float = 1e-9) -> dict[str, list[tuple[float, float]]]:
    """Per kind, (start, width) bars with back-to-back iterations of the same kind merged."""
    out: dict[str, list[list[float]]] = {}
    last_kind, last = None, None
    for it in records:
        s, e = it.start_s - t0, it.end_s - t0
        if it.kind == last_kind and s - last[1] <= eps:
            last[1] = e
            continue
        last_kind, last = it.kind, [s, e]
        out.setdefault(it.kind, []).append(last)
    return {k: [(s, e - s) for s, e in v] for k, v in out.items()}


def _sec(v: float, scale: float) -> str:
    """Seconds with one decimal, or more on short time axes."""
    return f"{v:.1f}" if scale >= 20 else f"{v:.2f}" if scale >= 2 else f"{v:.3f}"


def _widen(bars: list[tuple[float, float]], min_w: float) -> list[tuple[float, float]]:
    """Widen bars narrower than ``min_w`` around their centre (drawing only)."""
    return [(s + (w - min_w) / 2, min_w) if w < min_w else (s, w) for s, w in bars]


# -- Gantt ---------------------------------------------------------------------------------------

def plot_gantt(runs: list[tuple[str, RunRecord]], path, lower_bound_s: float | None = None) -> Path:
    """One panel per run, one row per replica, iterations coloured by kind, idle time left blank.

    Each panel marks its run's makespan (solid) and the lower bound (dashed, if given); all
    panels share the time axis. Prefill and mixed iterations shorter than ~1 px are drawn
    1 px wide so that each stays visible at this scale. The blank tail after a replica's
    last iteration is labelled with its length: time lost to the load imbalance.
    """
    if not runs:
        raise ValueError("plot_gantt needs at least one run")
    _, _, Patch, Line2D = _matplotlib()
    n_rows = [max(len(rec.replicas), 1) for _, rec in runs]
    row_h = 0.42
    height = sum(1.3 + row_h * n for n in n_rows) + 0.9
    fig = _new_figure(height)
    axes = fig.subplots(len(runs), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [n + 1.8 for n in n_rows]})[:, 0]

    spans = [_makespan(rec) for _, rec in runs]
    x_max = max(spans + [lower_bound_s or 0.0, 1e-9]) * 1.1
    # data width of MIN_BAR_PX pixels (the axes span ~88 % of the figure width)
    min_w = x_max * MIN_BAR_PX / (WIDTH_IN * DPI * 0.88)

    present: set[str] = set()
    for ax, (label, rec), span in zip(axes, runs, spans):
        t0 = _origin(rec)
        names = []
        shares: dict[str, float] = {}
        for row, r in enumerate(rec.replicas):
            names.append(r.name)
            segs = _segments(r.records, t0)
            present.update(segs)
            for kind, bars in segs.items():
                shares[kind] = shares.get(kind, 0.0) + sum(w for _, w in bars)
            # decode underneath; the short prefill / mixed bars on top, widened to stay visible
            for kind in (DECODE, MIXED, PREFILL):
                bars = segs.get(kind)
                if not bars:
                    continue
                if kind != DECODE:
                    bars = _widen(bars, min_w)
                ax.broken_barh(bars, (row - 0.36, 0.72), facecolors=KIND_COLORS[kind], linewidth=0)
            end = r.records[-1].end_s - t0 if r.records else 0.0
            idle = span - end
            if idle > 0.005 * x_max:
                ax.annotate("", xy=(span, row), xytext=(end, row),
                            arrowprops={"arrowstyle": "<->", "color": "#777777", "lw": 1.0,
                                        "shrinkA": 0, "shrinkB": 0})
            if idle >= 0.0005 * x_max:
                ax.text(span + 0.006 * x_max, row, f"idle {_sec(idle, x_max)} s", ha="left", va="center",
                        fontsize=FONT_SIZE - 2, color="#444444")
        ax.axvline(span, color=MAKESPAN_COLOR, lw=1.8)
        if lower_bound_s:
            ax.axvline(lower_bound_s, color=BOUND_COLOR, lw=1.8, ls="--")
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(len(names) - 0.5, -0.6)          # replica 0 on top
        ax.set_ylabel("replica")
        title = f"{label}: makespan {_sec(span, x_max)} s"
        if lower_bound_s:
            title += f" ({100 * (span / lower_bound_s - 1):+.1f} % vs lower bound)"
        title += f", busy utilization {100 * _busy_utilization(rec):.1f} %"
        busy = sum(r.busy_s for r in rec.replicas)
        if busy > 0 and PREFILL in shares:
            title += f", prefill-only iterations {100 * shares[PREFILL] / busy:.1f} % of busy time"
        ax.set_title(title, loc="left")
        ax.grid(axis="x", color="#dddddd", lw=0.6)
        ax.set_axisbelow(True)
        _style(ax)
    axes[-1].set_xlim(0, x_max)
    axes[-1].set_xlabel("time since first arrival (s)")

    handles = [Patch(facecolor=KIND_COLORS[k], label=KIND_LABELS[k]) for k in (DECODE, PREFILL, MIXED) if k in present]
    handles.append(Patch(facecolor="white", edgecolor="#999999", label="idle"))
    handles.append(Line2D([], [], color=MAKESPAN_COLOR, lw=1.8, label="makespan"))
    if lower_bound_s:
        handles.append(Line2D([], [], color=BOUND_COLOR, lw=1.8, ls="--", label=f"lower bound {lower_bound_s:.1f} s"))
    if present - {DECODE}:
        handles.append(Patch(facecolor="none", edgecolor="none", label="(short iterations drawn ≥ 1 px wide)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=FONT_SIZE - 1,
               frameon=False)
    return _save(fig, path)


# -- occupancy -----------------------------------------------------------------------------------

def occupancy_series(rec: RunRecord, bins: int = 600) -> tuple[np.ndarray, np.ndarray, float]:
    """Time-averaged batch occupancy of the whole run in ``bins`` equal bins.

    Occupancy = sequences holding a batch slot, summed over replicas, / total slots (an idle
    replica counts as 0). Returns (bin edges in s since the first arrival, per-bin average,
    makespan). The averages are exact: the piecewise-constant occupancy is integrated.
    """
    t0 = _origin(rec)
    span = _makespan(rec)
    slots = sum(r.max_batch for r in rec.replicas) or 1
    recs = [it for r in rec.replicas for it in r.records]
    edges = np.linspace(0.0, span if span > 0 else 1.0, bins + 1)
    if not recs or span <= 0:
        return edges, np.zeros(bins), span
    start = np.fromiter((it.start_s for it in recs), float, len(recs)) - t0
    end = np.fromiter((it.end_s for it in recs), float, len(recs)) - t0
    res = np.fromiter((it.resident for it in recs), float, len(recs)) / slots
    times = np.concatenate([start, end])
    delta = np.concatenate([res, -res])
    order = np.argsort(times, kind="stable")
    times, level = times[order], np.cumsum(delta[order])
    # integral of the step function at each event time, then at the bin edges (linear between events)
    integral = np.concatenate([[0.0], np.cumsum(level[:-1] * np.diff(times))])
    at_edges = np.interp(edges, times, integral, left=0.0, right=integral[-1])
    return edges, np.diff(at_edges) / np.diff(edges), span


def plot_occupancy(runs: list[tuple[str, RunRecord]], path, bins: int = 600) -> Path:
    """Batch occupancy over time, one step line per run, makespans marked."""
    if not runs:
        raise ValueError("plot_occupancy needs at least one run")
    fig = _new_figure(5.2)
    ax = fig.subplots()
    x_max = 0.0
    for i, (label, rec) in enumerate(runs):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        edges, occ, span = occupancy_series(rec, bins)
        x_max = max(x_max, span)
        mean = float(np.sum(occ * np.diff(edges)) / (edges[-1] - edges[0])) if span > 0 else 0.0
        xs = np.append(edges, edges[-1])
        ys = np.concatenate([occ, [occ[-1] if len(occ) else 0.0, 0.0]]) * 100
        # earlier runs drawn thicker and underneath, so overlapping lines (both at 100 %) stay visible
        ax.step(xs, ys, where="post", color=color, lw=1.4 + 2.4 * (len(runs) - 1 - i) / max(len(runs) - 1, 1), zorder=2 + i, label=f"{label} (mean {100 * mean:.1f} %)")
        ax.axvline(span, color=color, lw=1.3, ls=":")
        ax.text(span, 104 + 7 * i, f"{label} makespan {span:.1f} s ", color=color, ha="right",
                va="bottom", fontsize=FONT_SIZE - 1)
    ax.set_xlim(0, x_max * 1.02 if x_max > 0 else 1.0)
    ax.set_ylim(0, 104 + 7 * len(runs) + 4)
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlabel("time since first arrival (s)")
    ax.set_ylabel("batch occupancy (% of all slots)")
    ax.set_title(f"Batch occupancy over time (time-averaged in {x_max / bins:.2g} s bins; "
                 "dotted lines: makespans)", loc="left")
    ax.grid(color="#e3e3e3", lw=0.6)
    fig.legend(loc="outside lower center", fontsize=FONT_SIZE - 1, frameon=False, ncol=min(len(runs), 4))
    _style(ax)
    return _save(fig, path)


# -- replica finish times ------------------------------------------------------------------------

def plot_finish_times(runs_with_summaries: list[tuple[str, Summary]], path,
                      lower_bound_s: float | None = None) -> Path:
    """Each replica's finish time per run (dots on stems from the lower bound), lower bound as a line."""
    if not runs_with_summaries:
        raise ValueError("plot_finish_times needs at least one run")
    _, _, _, Line2D = _matplotlib()
    if lower_bound_s is None:
        lower_bound_s = next((s.lower_bound_s for _, s in runs_with_summaries if s.lower_bound_s), None)
    names: list[str] = []
    for _, s in runs_with_summaries:
        names += [n for n in s.replica_finish_s if n not in names]
    fig = _new_figure(5.2)
    ax = fig.subplots()
    k = len(runs_with_summaries)
    width = 0.7 / max(k, 1)
    values = [v for _, s in runs_with_summaries for v in s.replica_finish_s.values()]
    base = lower_bound_s if lower_bound_s else min(values, default=0.0)
    lo = min(values + [base], default=0.0)
    hi = max(values + [base], default=1.0)
    pad = max(hi - lo, 1e-6 * max(hi, 1.0)) * 0.12
    for i, (label, s) in enumerate(runs_with_summaries):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        xs = np.array([names.index(n) for n in s.replica_finish_s]) + (i - (k - 1) / 2) * width
        ys = np.array(list(s.replica_finish_s.values()))
        ax.vlines(xs, base, ys, color=color, lw=2.2, alpha=0.6)
        ax.plot(xs, ys, "o", color=color, ms=8, label=f"{label} (makespan {s.makespan_s:.1f} s)")
        for x, y in zip(xs, ys):                    # label on the side away from the stem
            above = y >= base
            ax.text(x, y + (1 if above else -1) * pad * 0.25, f"{y:.1f}", ha="center",
                    va="bottom" if above else "top", fontsize=FONT_SIZE - 2, color=color)
        ax.axhline(s.makespan_s, color=color, lw=1.0, ls=":")
    handles, _ = ax.get_legend_handles_labels()
    if lower_bound_s:
        ax.axhline(lower_bound_s, color=BOUND_COLOR, lw=1.8, ls="--")
        handles.append(Line2D([], [], color=BOUND_COLOR, lw=1.8, ls="--", label=f"lower bound {lower_bound_s:.1f} s"))
    handles.append(Line2D([], [], color="#666666", lw=1.0, ls=":", label="makespan of each run"))
    ax.set_ylim(lo - 1.5 * pad, hi + 1.5 * pad)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("replica")
    ax.set_ylabel("last iteration ends (s)")
    ax.set_title("Per-replica finish times (the makespan is the latest; y axis does not start at 0)", loc="left")
    ax.grid(axis="y", color="#e3e3e3", lw=0.6)
    fig.legend(handles=handles, loc="outside lower center", fontsize=FONT_SIZE - 1, frameon=False,
               ncol=min(len(handles), 4))
    _style(ax)
    return _save(fig, path)


# -- all three -----------------------------------------------------------------------------------

def write_plots(runs: list[tuple[str, RunRecord, Summary]], directory,
                lower_bound_s: float | None = None) -> list[Path]:
    """Write gantt.png, occupancy.png and finish_times.png into ``directory``; return their paths."""
    if not runs:
        raise ValueError("write_plots needs at least one run")
    _matplotlib()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if lower_bound_s is None:
        lower_bound_s = next((s.lower_bound_s for _, _, s in runs if s.lower_bound_s), None)
    records = [(label, rec) for label, rec, _ in runs]
    return [
        plot_gantt(records, directory / "gantt.png", lower_bound_s),
        plot_occupancy(records, directory / "occupancy.png"),
        plot_finish_times([(label, s) for label, _, s in runs], directory / "finish_times.png", lower_bound_s),
    ]
