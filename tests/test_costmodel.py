from pathlib import Path

import pytest

from hybrid_ray.costmodel import CostModel, DecodeCost, PrefillCost
from hybrid_ray.profiles import fit_cost_model, load_profile

PROFILES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "profiles"
needs_profiles = pytest.mark.skipif(not PROFILES.exists(), reason="shared/data/profiles not present")

CM = CostModel(PrefillCost(0.05, 0.01, 1e-4, 1e-9), DecodeCost(0.02, 1e-5, 1e-7))


def test_prefill_roofline_and_attention():
    assert CM.prefill_time(100, 0) == pytest.approx(0.05)          # floor: bandwidth bound
    assert CM.prefill_time(1000, 0) == pytest.approx(0.11)         # linear: compute bound
    assert CM.prompt_prefill_time([1000]) == pytest.approx(0.11 + 1e-3)
    assert CM.prompt_prefill_time([500, 500]) == pytest.approx(0.11 + 5e-4)


def test_decode_and_mixed():
    assert CM.decode_time(10, 1000) == pytest.approx(0.02 + 1e-4 + 1e-4)
    # mixed is at least the decode, and equals the prefill plus the decode's linear parts when larger
    assert CM.mixed_time(0, 0, 10, 1000) == CM.decode_time(10, 1000)
    small_floor = CostModel(PrefillCost(0.015, 0.0, 1e-4, 0.0), CM.decode)
    assert small_floor.mixed_time(10, 100, 10, 1000) == pytest.approx(small_floor.decode_time(10, 1000))
    big = CM.mixed_time(2000, 0, 10, 1000)
    assert big == pytest.approx(CM.prefill_time(2000, 0) + 1e-4 + 1e-4)
    assert CM.scaled(2).decode_time(10, 1000) == pytest.approx(2 * CM.decode_time(10, 1000))


@needs_profiles
@pytest.mark.parametrize("name", ["h100_llama-7b.csv", "h100_llama-13b.csv", "h100_llama-65b-10of80.csv"])
def test_fit_within_10_percent_on_measured_h100(name):
    model, rep = fit_cost_model(load_profile(PROFILES / "h100_measured" / name))
    assert rep.max_rel_err < 0.10
    assert rep.n_prefill >= 10 and rep.n_decode >= 15
    assert model.decode.base_s > 0 and model.prefill.per_token_s > 0


@needs_profiles
def test_fit_splitwise_llama70b_h100_tp4():
    pts = load_profile(PROFILES / "splitwise" / "perf_model.csv", "llama2-70b", "h100-80gb", 4)
    model, rep = fit_cost_model(pts)
    assert rep.max_rel_err < 0.10
    # per-token decode ~ 30 ms at batch 1 for Llama-2-70B TP4 on H100 (Splitwise's table)
    assert 0.025 < model.decode_time(1, 1000) < 0.035


@needs_profiles
def test_shipped_paper_config_matches_fit():
    """The coefficients in paper_llama65b.yaml are the 65B fit scaled by 1/(2 x 0.8)."""
    from hybrid_ray.config import load_cluster
    model, _ = fit_cost_model(load_profile(PROFILES / "h100_measured" / "h100_llama-65b-10of80.csv"))
    shipped = load_cluster("paper_llama65b").groups[0].cost_model
    want = model.scaled(1 / 1.6)
    for b in (1, 8):
        assert shipped.decode_time(b, 200 * b) == pytest.approx(want.decode_time(b, 200 * b), rel=1e-4)
    assert shipped.prompt_prefill_time([70] * 8) == pytest.approx(want.prompt_prefill_time([70] * 8), rel=1e-4)


def _replay(cost: CostModel, policy: str):
    """A simulated replay whose 'measured' iteration times are ``cost``'s (one replica, GSM8K 64)."""
    from hybrid_ray.inputs import load_inputs
    from hybrid_ray.planning import build_scheduler
    from hybrid_ray.simulator import simulate

    from helpers import one_replica

    cl, reqs = load_inputs("cpu_tiny", "gsm8k", 64, seed=3)
    cl = one_replica(cl, cost)
    rec = simulate(cl, build_scheduler(policy, cl, reqs), reqs)
    return [r for st in rec.replicas for r in st.records]


@pytest.mark.parametrize("policy", ["baseline", "hybrid"])
def test_calibrate_recovers_each_phases_level(policy):
    """Measured = the truth; the profile's model is off by 0.5 x (prefill) and 0.8 x (decode)."""
    from hybrid_ray.profiles import calibrate

    truth = CostModel(PrefillCost(3e-4, 2e-4, 4e-6, 6e-9), DecodeCost(4e-4, 2e-5, 2e-7))
    records = _replay(truth, policy)
    kinds = {r.kind for r in records}
    assert {"prefill", "decode"} <= kinds and (policy == "baseline") == ("mixed" not in kinds)
    calibrated, cal = calibrate(truth.scaled(0.5, 0.8), records)
    assert cal.prefill_scale == pytest.approx(2.0) and cal.decode_scale == pytest.approx(1.25)
    for phase in ("prefill", "decode"):
        got, want = calibrated.to_dict()[phase], truth.to_dict()[phase]
        assert got == pytest.approx(want, rel=1e-9)
    # every recorded iteration, mixed ones included, is now predicted exactly
    assert all(r.predicted_s(calibrated) == pytest.approx(r.end_s - r.start_s, rel=1e-9) for r in records)
    assert cal.iterations["decode"] == sum(r.kind == "decode" for r in records)
    assert "scaled prefill x2.000, decode x1.250" in cal.lines()


def test_calibrate_needs_iterations_and_keeps_an_unseen_phase():
    from hybrid_ray.errors import WorkloadError
    from hybrid_ray.profiles import calibrate

    with pytest.raises(WorkloadError, match="no iterations"):
        calibrate(CM, [])
    decode_only = [r for r in _replay(CM, "baseline") if r.kind == "decode"]
    calibrated, cal = calibrate(CM.scaled(1.0, 0.5), decode_only)
    assert cal.prefill_scale == 1.0 and cal.decode_scale == pytest.approx(2.0)
    assert calibrated.prefill == CM.prefill


def test_calibration_level_ignores_a_passing_stall():
    """One iteration held up 200 x (a daemon, a GC pause) must not move the level; a steady 1.3 x must."""
    from hybrid_ray.profiles import calibrate
    from hybrid_ray.replica import IterationRecord

    def recs(times):
        out, t = [], 0.0
        for d in times:
            out.append(IterationRecord(t, t + d, "decode", 4, 0, 0, 4, 0, 400))
            t += d
        return out

    step = CM.decode_time(4, 400)
    stalled = [step] * 300
    stalled[150] *= 200
    _, cal = calibrate(CM, recs(stalled))
    assert cal.decode_scale == pytest.approx(1.0) and cal.measured_s["decode"] > 1.6 * cal.predicted_s["decode"]
    _, cal = calibrate(CM, recs([1.3 * step] * 300))
    assert cal.decode_scale == pytest.approx(1.3)
    _, cal = calibrate(CM, recs([1.3 * step] * 10))            # too few for blocks: the plain ratio
    assert cal.decode_scale == pytest.approx(1.3) and cal.prefill_scale == 1.0
