"""Figures: write_plots renders three legible, non-blank PNGs; a missing matplotlib gives a clear error."""
from __future__ import annotations

import builtins

import numpy as np
import pytest

from hybrid_ray import plots
from hybrid_ray.errors import HybridRayError
from hybrid_ray.inputs import load_inputs
from hybrid_ray.metrics import summarize
from hybrid_ray.planner.bounds import lower_bound
from hybrid_ray.planning import build_scheduler
from hybrid_ray.replica import DECODE, MIXED, PREFILL
from hybrid_ray.simulator import simulate

NAMES = ("gantt.png", "occupancy.png", "finish_times.png")


def _rgb(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)], dtype=float)


def _load(path) -> np.ndarray:
    """The PNG as an (H, W, 3) array of 0-255 floats."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    if img.dtype != np.uint8 and img.max() <= 1.0:
        img = img * 255.0
    return img[..., :3].astype(float)


def _near(img: np.ndarray, hex_color: str, tol: float = 12) -> int:
    """Pixels within ``tol`` (per channel) of a colour."""
    return int((np.abs(img - _rgb(hex_color)).max(axis=-1) <= tol).sum())


@pytest.fixture(scope="module")
def runs():
    cl, reqs = load_inputs("paper_llama65b", "gsm8k", limit=150, seed=1)
    lb = lower_bound(cl, reqs).value_s
    out = []
    for policy in ("baseline", "hybrid"):
        opts = {"method": "lpt"} if policy == "hybrid" else {}
        rec = simulate(cl, build_scheduler(policy, cl, reqs, **opts), reqs)
        out.append((policy, rec, summarize(rec, lb)))
    return out, lb


@pytest.fixture(scope="module")
def written(runs, tmp_path_factory):
    pytest.importorskip("matplotlib")
    directory = tmp_path_factory.mktemp("plots") / "nested" / "dir"      # created by write_plots
    return plots.write_plots(runs[0], directory)


def test_write_plots_returns_the_three_files(written):
    paths = written
    assert [p.name for p in paths] == list(NAMES)
    for p in paths:
        assert p.is_file() and p.stat().st_size > 10_000


@pytest.mark.parametrize("name", NAMES)
def test_png_is_large_and_not_blank(written, name):
    paths = written
    img = _load(next(p for p in paths if p.name == name))
    h, w = img.shape[:2]
    assert 600 < w <= 2400 and 600 < h <= 4000, (w, h)
    assert img.std() > 10                                   # not a flat image
    colours = np.unique(img.reshape(-1, 3).astype(np.uint8), axis=0)
    assert len(colours) > 20
    # mostly white background, but a real share of drawn pixels
    white = (img.min(axis=-1) > 250).mean()
    assert 0.2 < white < 0.98, white


def test_gantt_shows_iteration_kinds(written, runs):
    paths = written
    img = _load(paths[0])
    assert _near(img, plots.KIND_COLORS[DECODE]) > 50_000       # the bulk of every row
    assert _near(img, plots.KIND_COLORS[PREFILL]) > 300         # baseline's prefill-only iterations
    recs = [rec for _, rec, _ in runs[0]]
    if any(it.kind == MIXED for rec in recs for r in rec.replicas for it in r.records):
        assert _near(img, plots.KIND_COLORS[MIXED]) > 300       # hybrid's mixed iterations
    assert _near(img, plots.BOUND_COLOR) > 100                  # the lower-bound line


def test_kind_colours_are_distinct():
    cols = [_rgb(c) for c in plots.KIND_COLORS.values()]
    for i in range(len(cols)):
        for j in range(i + 1, len(cols)):
            assert np.abs(cols[i] - cols[j]).max() > 60


def test_other_figures_use_run_colours(written):
    paths = written
    for p in paths[1:]:
        img = _load(p)
        for color in plots.RUN_COLORS[:2]:
            assert _near(img, color, tol=20) > 200, (p.name, color)


def test_gantt_draws_merged_segments_not_iterations(runs, tmp_path, monkeypatch):
    """Why rendering is fast, counted instead of timed: one bar collection per replica and kind,
    holding back-to-back iterations merged into segments (far fewer bars than iterations)."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    calls = []
    broken_barh = Axes.broken_barh

    def counting(self, xranges, *a, **k):
        calls.append(len(xranges))
        return broken_barh(self, xranges, *a, **k)

    monkeypatch.setattr(Axes, "broken_barh", counting)
    recs = [(label, rec) for label, rec, _ in runs[0]]
    plots.plot_gantt(recs, tmp_path / "g.png")
    replicas = sum(len(rec.replicas) for _, rec in recs)
    iterations = sum(len(r.records) for _, rec in recs for r in rec.replicas)
    segments = sum(len(bars) for _, rec in recs for r in rec.replicas
                   for bars in plots._segments(r.records, 0.0).values())
    assert replicas <= len(calls) <= 3 * replicas             # decode, prefill, mixed
    assert sum(calls) == segments < iterations / 2


def test_single_plot_functions_and_lower_bound_argument(runs, tmp_path):
    pytest.importorskip("matplotlib")
    run_list, lb = runs
    recs = [(label, rec) for label, rec, _ in run_list]
    g = plots.plot_gantt(recs[:1], tmp_path / "g.png", lower_bound_s=None)
    o = plots.plot_occupancy(recs, tmp_path / "o.png")
    f = plots.plot_finish_times([(label, s) for label, _, s in run_list], tmp_path / "f.png", lower_bound_s=lb)
    for p in (g, o, f):
        assert p.is_file() and _load(p).shape[1] > 600


def test_occupancy_series_is_exact_time_average(runs):
    _, rec, s = runs[0][0]
    edges, occ, span = plots.occupancy_series(rec, bins=50)
    assert span == pytest.approx(s.makespan_s)
    assert len(edges) == 51 and len(occ) == 50
    assert np.all(occ >= -1e-9) and np.all(occ <= 1 + 1e-9)
    mean = float(np.sum(occ * np.diff(edges)) / span)
    assert mean == pytest.approx(s.utilization_slots, rel=1e-6)


def test_segments_merge_back_to_back_iterations():
    from hybrid_ray.replica import IterationRecord as R

    recs = [R(0, 1, DECODE, 1, 0, 0, 1), R(1, 2, DECODE, 1, 0, 0, 1), R(2, 2.5, PREFILL, 0, 1, 9, 2),
            R(2.5, 3, DECODE, 2, 0, 0, 2), R(4, 5, DECODE, 2, 0, 0, 2)]       # gap 3..4 stays idle
    segs = plots._segments(recs, 0.0)
    assert segs[DECODE] == [(0, 2), (2.5, 0.5), (4, 1)]
    assert segs[PREFILL] == [(2, 0.5)]


def test_missing_matplotlib_raises_clear_error(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(HybridRayError, match=r"pip install 'hybrid-ray\[plot\]'"):
        plots.write_plots([("x", None, None)], tmp_path / "out")
    with pytest.raises(HybridRayError, match="matplotlib"):
        plots.plot_gantt([("x", None)], tmp_path / "g.png")
    assert not (tmp_path / "out").exists()          # nothing written before the check
