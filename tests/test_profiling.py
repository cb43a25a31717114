"""profile -> fit -> simulate: the cost model measured on the real engine predicts the real engine's makespan.

Needs the [engine] extra. Every comparison profiles on the machine that runs the test, so a
slower or faster CI host changes both sides alike.
"""
from __future__ import annotations

import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from hybrid_ray.cli import main                                      # noqa: E402
from hybrid_ray.engines.transformers import TransformersEngine       # noqa: E402
from hybrid_ray.inputs import load_inputs                            # noqa: E402
from hybrid_ray.policies import build_scheduler                      # noqa: E402
from hybrid_ray.profiles import calibrate, fit_cost_model, load_profile          # noqa: E402
from hybrid_ray.profiling import (DEFAULT_GRID, ProfileGrid, calibrate_on_run, parse_pairs,  # noqa: E402
                                  profile_engine, replay_records, run_replica, write_profile)
from hybrid_ray.runtime import RunOptions, run                       # noqa: E402
from hybrid_ray.simulator import simulate                            # noqa: E402

from helpers import one_replica                                      # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return TransformersEngine("tiny", threads=1)


@pytest.fixture(scope="module")
def fitted(engine):
    """The tiny model's cost model, profiled here with the default grid."""
    cost, report = fit_cost_model(profile_engine(engine, DEFAULT_GRID))
    return cost, report


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


def test_default_grid_fits_within_15_percent(fitted):
    _, report = fitted
    assert report.prefill_max_rel_err < 0.15 and report.decode_max_rel_err < 0.15, report


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


FIDELITY_RUNS = 3      # each run's makespan varies +-7 % on a 2-core host: the median of 3 is compared


def _makespan_ratio(reals: list[float], cluster, requests) -> float:
    sim = simulate(cluster, build_scheduler("baseline", cluster, requests), requests).makespan_s
    real = sorted(reals)[len(reals) // 2]
    print(f"real {', '.join(f'{x:.3f}' for x in reals)} s (median {real:.3f}), simulate {sim:.3f} s, "
          f"ratio {real / sim:.3f} (each: {', '.join(f'{x / sim:.3f}' for x in reals)})")
    return real / sim


def test_calibrated_model_predicts_one_real_replica_within_15_percent(engine, fitted):
    """64 GSM8K requests on one tiny replica, driven in-process: real iterations vs the simulator.

    The grid's model is calibrated on a different sample (128, seed 1) replayed the same way, then
    predicts the first 64. The grid alone ran 13-26 % fast here (docs/engines.md, Fidelity).
    """
    one = one_replica(load_inputs("cpu_tiny", "gsm8k", 1)[0], fitted[0])
    _, calib = load_inputs("cpu_tiny", "gsm8k", 128, seed=1)
    cost, cal = calibrate(fitted[0], replay_records([run_replica(engine, one, calib)]))
    assert cal.decode_scale > 0.9 and cal.iterations["decode"] > 1000
    cluster, requests = load_inputs("cpu_tiny", "gsm8k", 64)
    assert len({q.id for q in requests} & {q.id for q in calib}) < 16     # mostly held-out requests
    cluster = one_replica(cluster, cost)
    reals = []
    for _ in range(FIDELITY_RUNS):
        state = run_replica(engine, cluster, requests)
        assert len(state.finished) == len(requests)
        reals.append(state.records[-1].end_s)
    assert 0.85 < _makespan_ratio(reals, cluster, requests) < 1.15


@pytest.mark.ray
def test_calibrated_model_predicts_a_ray_run_within_15_percent(ray_session, fitted, tmp_path):
    """The done-when command: cpu_tiny, GSM8K 64, real model iterations on 2 Ray replicas; vs simulate.

    Calibrated (``profile --calibrate``'s path) on a seeded sample run the same way: on a 2-core
    host the two replicas share the cores with Ray's processes, 1.5-1.65 x the grid's prediction.
    """
    cluster, calib = load_inputs("cpu_tiny", "gsm8k", 128, seed=1)
    cost, cal, _ = calibrate_on_run(fitted[0], cluster, calib, engine="transformers", model="tiny")
    print(cal.lines())
    cluster, requests = load_inputs("cpu_tiny", "gsm8k", 64)
    cluster = cluster.with_cost_model(cost)
    reals = []
    for k in range(FIDELITY_RUNS):      # no --engine: cpu_tiny.yaml's engine: {kind: transformers, model: tiny}
        res = run(RunOptions(progress=False, output=str(tmp_path / f"r{k}.jsonl")), cluster=cluster,
                  requests=requests)
        assert res.summary.requests_completed == 64 and res.engine == "transformers (tiny, cpu)"
        assert sum(s.generated for s in res.record.sequences) == sum(q.output_tokens for q in requests)
        reals.append(res.summary.makespan_s)
    assert 0.85 < _makespan_ratio(reals, cluster, requests) < 1.15


@pytest.mark.ray
def test_profile_command_calibrates_on_a_run(ray_session, tmp_path, capsys):
    assert main(["profile", "--engine", "transformers", "--model", "tiny", "--prefill", "1x64,1x128,2x128",
                 "--decode", "1x64,2x128,4x256", "--reps", "3", "--out", str(tmp_path / "p.csv"),
                 "--calibrate", "--limit", "8", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "calibrating on 8 gsm8k requests (seed 5), 2 replicas" in out
    scales = re.search(r"scaled prefill x([0-9.]+), decode x([0-9.]+)", out)
    assert scales and all(0.2 < float(x) < 10 for x in scales.groups())      # a coarse grid, 8 requests
    block = out[out.index("cost_model:"):]
    decode_base = float(re.search(r"decode: \{base_s: ([0-9.e-]+)", block).group(1))
    fitted_base = fit_cost_model(load_profile(tmp_path / "p.csv"))[0].decode.base_s
    assert decode_base == pytest.approx(fitted_base * float(scales.group(2)), rel=2e-3)   # printed rounded
