"""profile -> fit -> simulate: the cost model measured on the real engine predicts the real engine's makespan.

Needs the [engine] extra. The default suite checks what is deterministic: every grid point is
measured, the fit recovers known coefficients, a real replay runs exactly the simulator's
iterations (so a makespan ratio is the per-iteration level alone), and calibration lands on that
level. How close the measured figures come (fit error, calibration scales, real / simulated
makespan) depends on how busy the host is: those are ``hybrid-ray bench fidelity`` and the
``slow`` tests at the end, which profile on the machine that runs them.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest

from hybrid_ray.costmodel import CostModel, DecodeCost, PrefillCost

pytest.importorskip("torch")
pytest.importorskip("transformers")

from hybrid_ray.bench import fidelity                                 # noqa: E402
from hybrid_ray.cli import main                                      # noqa: E402
from hybrid_ray.config import load_cluster                           # noqa: E402
from hybrid_ray.engines.transformers import TransformersEngine       # noqa: E402
from hybrid_ray.inputs import load_inputs                            # noqa: E402
from hybrid_ray.planning import build_scheduler                      # noqa: E402
from hybrid_ray.profiles import ProfilePoint, calibrate, fit_cost_model, load_profile          # noqa: E402
from hybrid_ray.profiling import (DEFAULT_GRID, ProfileGrid, parse_pairs,  # noqa: E402
                                  profile_engine, replay_records, run_replica, write_profile)
from hybrid_ray.runtime import RunOptions, run                       # noqa: E402
from hybrid_ray.simulator import simulate                            # noqa: E402

from helpers import one_replica                                      # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return TransformersEngine("tiny", threads=1)


@pytest.fixture(scope="module")
def grid_points(engine):
    """The default grid, profiled here on the tiny model."""
    return profile_engine(engine, DEFAULT_GRID)


@pytest.fixture(scope="module")
def fitted(grid_points):
    """The tiny model's cost model fitted to the default grid (its error depends on the host's load)."""
    cost, report = fit_cost_model(grid_points)
    return cost, report


# Real-engine replica actors import torch and transformers in fresh worker processes: on a busy 2-core host
# that alone took over RunOptions' 60 s default. The tests here are not about start-up time.
STARTUP_S = 600.0


@pytest.fixture
def generous_startup(monkeypatch):
    """``run`` as called inside library code (``profile --calibrate``), with STARTUP_S to place its actors."""
    from dataclasses import replace

    from hybrid_ray import runtime

    real_run = runtime.run
    monkeypatch.setattr(runtime, "run", lambda opts, *a, **k: real_run(replace(opts, startup_timeout_s=STARTUP_S),
                                                                        *a, **k))


def _shape(records) -> list[tuple]:
    """An iteration's work, without its times."""
    return [(r.kind, r.batch, r.prefills, r.tokens, r.resident, r.attn_sq, r.ctx_tokens) for r in records]


def test_profile_points_round_trip_through_the_csv(engine, tmp_path):
    grid = ProfileGrid(parse_pairs("1x16,1x64,2x32", "p"), parse_pairs("1x32,2x64,4x64", "d"), reps=3, warmup=1)
    points = profile_engine(engine, grid)
    assert [(p.phase, p.batch, p.tokens) for p in points] == (
        [("prefill", b, n) for b, n in grid.prefill] + [("decode", b, n) for b, n in grid.decode])
    path = write_profile(points, tmp_path / "p.csv", "tiny", engine.layers)
    back = load_profile(path)
    assert [(p.phase, p.batch, p.tokens) for p in back] == [(p.phase, p.batch, p.tokens) for p in points]
    assert all(abs(a.seconds - b.seconds) < 1e-6 for a, b in zip(points, back))
    assert not engine._seqs                                  # profiling leaves no sequences behind


def test_default_grid_is_measured_and_fitted(grid_points, fitted):
    """Every grid point measured once, in grid order; a usable (finite, non-negative) model fitted to all."""
    assert [(p.phase, p.batch, p.tokens) for p in grid_points] == (
        [("prefill", b, n) for b, n in DEFAULT_GRID.prefill] + [("decode", b, n) for b, n in DEFAULT_GRID.decode])
    assert all(p.seconds > 0 and math.isfinite(p.seconds) for p in grid_points)
    cost, report = fitted
    assert (report.n_prefill, report.n_decode) == (len(DEFAULT_GRID.prefill), len(DEFAULT_GRID.decode))
    coefs = [*cost.to_dict()["prefill"].values(), *cost.to_dict()["decode"].values()]
    assert all(c >= 0 and math.isfinite(c) for c in coefs), coefs
    assert math.isfinite(report.max_rel_err)
    assert cost.decode_time(1, 32) > 0 and cost.prompt_prefill_time([16]) > 0


TRUTH = load_cluster("cpu_tiny").groups[0].cost_model      # the tiny model's shipped (measured) cost model


def _synthetic_grid(cost, noise: float = 0.0, seed: int = 0) -> list[ProfilePoint]:
    """The default grid's points as ``cost`` predicts them, times a seeded factor in [1 - noise, 1 + noise]."""
    rng = random.Random(seed)
    pts = [ProfilePoint("prefill", b, n, cost.prompt_prefill_time([n] * b)) for b, n in DEFAULT_GRID.prefill]
    pts += [ProfilePoint("decode", b, n, cost.decode_time(b, b * n)) for b, n in DEFAULT_GRID.decode]
    return [ProfilePoint(p.phase, p.batch, p.tokens, p.seconds * rng.uniform(1 - noise, 1 + noise)) for p in pts]


def test_fit_recovers_known_coefficients_on_the_default_grid(tmp_path):
    """Exact points on the default grid's shapes, through the profile CSV: the fit finds the model back."""
    path = write_profile(_synthetic_grid(TRUTH), tmp_path / "synthetic.csv", "tiny", 2)
    cost, report = fit_cost_model(load_profile(path))
    assert report.max_rel_err < 1e-3                 # the CSV keeps 0.1 us: rounding only
    for phase in ("prefill", "decode"):
        assert cost.to_dict()[phase] == pytest.approx(TRUTH.to_dict()[phase], rel=0.02), phase
    for b, n in DEFAULT_GRID.decode:
        assert cost.decode_time(b, b * n) == pytest.approx(TRUTH.decode_time(b, b * n), rel=1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_default_grid_fit_stays_within_twice_the_measurement_noise(seed):
    """The grid's shapes pin the model down: with +-4 % measurement noise the fit stays within 8 % of the
    points (5 % at most over seeds 0-9) and predicts the noiseless truth within 5 % (2.3 % at most)."""
    cost, report = fit_cost_model(_synthetic_grid(TRUTH, 0.04, seed))
    assert report.max_rel_err < 0.08, report
    for b, n in [(1, 64), (4, 128), (8, 256)]:
        assert cost.decode_time(b, b * n) == pytest.approx(TRUTH.decode_time(b, b * n), rel=0.05)
        assert cost.prompt_prefill_time([n] * b) == pytest.approx(TRUTH.prompt_prefill_time([n] * b), rel=0.05)


def test_profile_command_prints_the_fit_and_a_cost_model_block(tmp_path, capsys):
    out = tmp_path / "tiny.csv"
    assert main(["profile", "--engine", "transformers", "--model", "tiny", "--prefill", "1x16,1x64,2x32",
                 "--decode", "1x32,2x64,4x64", "--reps", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "prefill relative error" in text and "cost_model:" in text and "decode: {base_s:" in text
    assert len(load_profile(out)) == 6


def test_bad_grid_is_a_user_error(capsys):
    assert main(["profile", "--prefill", "4by128"]) == 2
    assert "BATCHxTOKENS" in capsys.readouterr().err


def test_real_replay_runs_the_simulators_iterations_and_calibration_sets_their_level(engine, fitted):
    """One real replica, in-process: the very iterations the simulator plans (only their times differ),
    so simulate on the calibrated model predicts the replay's iterations back to back, at the level that
    calibration measured; calibrating again changes nothing."""
    cluster, requests = load_inputs("cpu_tiny", "gsm8k", 24)
    cluster = one_replica(cluster, fitted[0])
    state = run_replica(engine, cluster, requests)
    assert len(state.finished) == len(requests)
    assert sum(s.generated for s in state.finished) == sum(q.output_tokens for q in requests)
    records = replay_records([state])
    sim = simulate(cluster, build_scheduler("baseline", cluster, requests), requests)
    assert _shape(records) == _shape(sim.replicas[0].records)
    assert all(b.start_s == a.end_s for a, b in zip(records, records[1:]))          # back to back
    cost, cal = calibrate(fitted[0], records)
    assert cal.iterations == dict(Counter(r.kind for r in records))
    assert cal.decode_scale > 0 and cal.prefill_scale > 0
    assert cost.to_dict()["decode"] == pytest.approx(fitted[0].scaled(1.0, cal.decode_scale).to_dict()["decode"])
    _, again = calibrate(cost, records)
    assert again.prefill_scale == pytest.approx(1.0) and again.decode_scale == pytest.approx(1.0)
    resim = simulate(one_replica(cluster, cost), build_scheduler("baseline", cluster, requests), requests)
    assert _shape(resim.replicas[0].records) == _shape(records)
    assert resim.makespan_s == pytest.approx(sum(r.predicted_s(cost) for r in records), rel=1e-9)


@pytest.mark.ray
def test_ray_run_of_the_real_engine_runs_the_simulators_iterations(ray_session, fitted, tmp_path):
    """cpu_tiny's 2 Ray replicas with real model iterations: the same requests on the same replicas in the
    same iterations as simulate (routing and batching do not depend on how long iterations take)."""
    cluster, requests = load_inputs("cpu_tiny", "gsm8k", 16)
    cluster = cluster.with_cost_model(fitted[0])
    res = run(RunOptions(progress=False, output=str(tmp_path / "r.jsonl"), startup_timeout_s=STARTUP_S),
              cluster=cluster, requests=requests)
    assert res.summary.requests_completed == 16 and res.engine == "transformers (tiny, cpu)"
    assert sum(s.generated for s in res.record.sequences) == sum(q.output_tokens for q in requests)
    sim = simulate(cluster, build_scheduler("baseline", cluster, requests), requests)
    assert {s.id: s.replica for s in res.record.sequences} == {s.id: s.replica for s in sim.sequences}
    real = {r.name: _shape(r.records) for r in res.record.replicas}
    assert real == {r.name: _shape(r.records) for r in sim.replicas}


@pytest.mark.ray
def test_profile_command_calibrates_on_a_run(ray_session, tmp_path, capsys, generous_startup):
    assert main(["profile", "--engine", "transformers", "--model", "tiny", "--prefill", "1x64,1x128,2x128",
                 "--decode", "1x64,2x128,4x256", "--reps", "3", "--out", str(tmp_path / "p.csv"),
                 "--calibrate", "--limit", "8", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "calibrating on 8 gsm8k requests (seed 5), 2 replicas" in out
    # counted: the calibration run ran the simulator's iterations (2 replicas, baseline: timing-independent)
    cluster, requests = load_inputs("cpu_tiny", "gsm8k", 8, seed=5)
    sim = simulate(cluster, build_scheduler("baseline", cluster, requests), requests)
    want = Counter(it.kind for r in sim.replicas for it in r.records)
    got = {k: int(n) for k, n in re.findall(r"^\s+(prefill|decode|mixed)\s+(\d+) iterations", out, re.M)}
    assert got == dict(want)
    # the scales are measurements (a 3-point grid on a host whose load may differ between profile and run:
    # x143 for prefill was seen on a busy one), so only their use is checked; their size is `bench fidelity`'s
    scales = re.search(r"scaled prefill x([0-9.]+), decode x([0-9.]+)", out)
    assert scales and all(float(x) > 0 for x in scales.groups())
    block = out[out.index("cost_model:"):]
    fitted = fit_cost_model(load_profile(tmp_path / "p.csv"))[0]
    printed = {}
    for phase in ("prefill", "decode"):
        fields = re.search(rf"{phase}: \{{([^}}]*)\}}", block).group(1)        # "floor_s: 0.001, base_s: ..."
        printed[phase] = {k: float(v) for k, v in (kv.split(": ") for kv in fields.split(", "))}
    model = CostModel(PrefillCost(**printed["prefill"]), DecodeCost(**printed["decode"]))
    # refitted from the CSV, whose times are rounded to 0.1 us, the coefficients can trade places (a floor
    # of 0 against a larger base): compare what the models predict on the grid, scaled, not coefficients
    # (one point may still move by several per cent: the median ratio over the grid is what is checked)
    pre, dec = map(float, scales.groups())
    ratios: dict[str, list[float]] = {"prefill": [], "decode": []}
    for p in load_profile(tmp_path / "p.csv"):
        if p.phase == "prefill":
            want, got = fitted.prompt_prefill_time([p.tokens] * p.batch) * pre, model.prompt_prefill_time([p.tokens] * p.batch)
        else:
            want = fitted.decode_time(p.batch, p.batch * p.tokens) * dec
            got = model.decode_time(p.batch, p.batch * p.tokens)
        ratios[p.phase].append(got / want)
    for phase, r in ratios.items():
        assert sorted(r)[len(r) // 2] == pytest.approx(1.0, abs=0.1), (phase, r)


# -- slow: measurement quality on this host (also `hybrid-ray bench fidelity`) ---------------------

@pytest.mark.slow
def test_default_grid_fits_within_15_percent(fitted):
    _, report = fitted
    assert report.prefill_max_rel_err < 0.15 and report.decode_max_rel_err < 0.15, report


@pytest.mark.slow
def test_calibrated_model_predicts_one_real_replica_within_15_percent(engine, fitted):
    """64 GSM8K requests on one tiny replica, driven in-process: real iterations vs the simulator.

    The grid's model is calibrated on a different sample (128, seed 1) replayed the same way, then
    predicts the first 64 (median of 3 runs: each varies +-7 % on a 2-core host). The grid alone ran
    13-26 % fast here (docs/engines.md, Fidelity).
    """
    row = fidelity.one_replica_row(engine, fitted[0], runs=3)
    print(row)
    assert row["decode_scale"] > 0.9 and row["decode_iterations"] > 1000
    assert row["held_out"] > 48 and row["finished"] == [64] * 3          # mostly held-out requests
    assert 0.85 < row["ratio"] < 1.15


@pytest.mark.slow
@pytest.mark.ray
def test_calibrated_model_predicts_a_ray_run_within_15_percent(ray_session, fitted, tmp_path, generous_startup):
    """The done-when command: cpu_tiny, GSM8K 64, real model iterations on 2 Ray replicas; vs simulate.

    Calibrated (``profile --calibrate``'s path) on a seeded sample run the same way: on a 2-core
    host the two replicas share the cores with Ray's processes, 1.5-1.65 x the grid's prediction.
    """
    row = fidelity.ray_row(fitted[0], runs=3, output_dir=str(tmp_path))
    print(row)
    assert row["completed"] == [64] * 3 and row["engines"] == ["transformers (tiny, cpu)"]
    assert row["generated"] == [row["expected_tokens"]] * 3
    assert 0.85 < row["ratio"] < 1.15
