"""Model error in the evaluation (`simulate --cost-noise SIGMA`, ``simulator.CostNoise``): the simulated
engines' iterations take the cost model's time x a fixed per-replica bias x a per-iteration factor of
mean 1; the planner, the replica state and every policy keep the nominal model."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from hybrid_ray.cli import main
from hybrid_ray.inputs import load_inputs
from hybrid_ray.metrics import summarize
from hybrid_ray.planning import build_scheduler
from hybrid_ray.simulator import CostNoise, simulate


@pytest.fixture(scope="module")
def local300():
    return load_inputs("local", "gsm8k", limit=300)


def _timeline(rec):
    return ([(s.id, s.replica, s.first_token_s, s.finish_s, s.preemptions) for s in rec.sequences],
            [[(x.start_s, x.end_s, x.kind, x.batch, x.tokens) for x in r.records] for r in rec.replicas])


# -- the object ---------------------------------------------------------------------------------------

def test_zero_noise_is_exactly_one_and_draws_nothing():
    n = CostNoise(0.0, seed=3)
    assert [n.factor(i) for i in range(4) for _ in range(5)] == [1.0] * 20
    assert n.bias(0) == 1.0 and n._rng == {}


@pytest.mark.parametrize("sigma", [-1.0, -1e-9, math.nan, math.inf])
def test_sigma_must_be_finite_and_non_negative(sigma):
    with pytest.raises(ValueError, match="finite number >= 0"):
        CostNoise(sigma)


def test_per_iteration_factor_has_mean_one_and_the_bias_is_lognormal():
    sigma, n = 0.2, 40_000
    noise = CostNoise(sigma, seed=11)
    bias = noise.bias(0)
    eps = [noise.factor(0) / bias for _ in range(n)]
    # mean 1: exp(N(-s^2/2, s^2)); its std is sqrt(exp(s^2) - 1) = 0.2020, so the mean's std error is 0.001
    assert statistics.fmean(eps) == pytest.approx(1.0, abs=0.005)
    assert statistics.fmean(math.log(e) for e in eps) == pytest.approx(-sigma ** 2 / 2, abs=0.005)
    assert statistics.pstdev(math.log(e) for e in eps) == pytest.approx(sigma, rel=0.03)
    # the per-replica biases: lognormal with median 1 and sigma 0.2 (1,000 replicas)
    logs = [math.log(CostNoise(sigma, seed=11).bias(i)) for i in range(1000)]
    assert statistics.fmean(logs) == pytest.approx(0.0, abs=0.02)
    assert statistics.pstdev(logs) == pytest.approx(sigma, rel=0.08)


def test_the_bias_is_fixed_per_replica_and_the_streams_independent():
    noise = CostNoise(0.1, seed=5)
    b = [noise.bias(i) for i in range(3)]
    assert len(set(b)) == 3 and all(0.5 < x < 2 for x in b)
    draws_1 = [noise.factor(1) for _ in range(50)]
    for _ in range(200):
        noise.factor(0)                        # replica 0 draws a lot: replica 1's stream is its own
    assert [noise.bias(i) for i in range(3)] == b
    again = CostNoise(0.1, seed=5)
    assert [again.factor(1) for _ in range(50)] == draws_1
    assert noise.fresh().factor(1) == draws_1[0]     # fresh(): the same streams from their start
    assert CostNoise(0.1, seed=6).bias(0) != b[0]


# -- in the simulator ---------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["hybrid", "vllm", "serve-llm", "raydata", "lpt-engine"])
def test_noise_zero_is_the_exact_run(local300, policy):
    cl, reqs = local300
    plain = simulate(cl, build_scheduler(policy, cl, reqs, lengths="online", method="lpt"), reqs)
    zero = simulate(cl, build_scheduler(policy, cl, reqs, lengths="online", method="lpt"), reqs,
                    noise=CostNoise(0.0, seed=9))
    assert _timeline(zero) == _timeline(plain)
    assert summarize(zero).to_dict() == summarize(plain).to_dict()
    assert "cost_noise" not in zero.extra


@pytest.mark.parametrize("policy", ["hybrid", "serve"])
def test_noise_is_deterministic_per_seed_and_differs_across_seeds(local300, policy):
    cl, reqs = local300

    def run(seed: int):
        return simulate(cl, build_scheduler(policy, cl, reqs, lengths="online", method="lpt"), reqs,
                        noise=CostNoise(0.05, seed))

    a, b, c = run(1), run(1), run(2)
    assert _timeline(a) == _timeline(b)
    assert a.makespan_s != c.makespan_s
    assert a.extra["cost_noise"]["bias"] != c.extra["cost_noise"]["bias"]
    one = CostNoise(0.05, 1)
    assert simulate(cl, build_scheduler(policy, cl, reqs, lengths="online", method="lpt"), reqs,
                    noise=one).makespan_s == a.makespan_s
    assert simulate(cl, build_scheduler(policy, cl, reqs, lengths="online", method="lpt"), reqs,
                    noise=one).makespan_s == a.makespan_s        # one object, two runs: the same draws


def _spy_reports(sch, seen: list):
    """Wrap the scheduler's iteration policy: log each replica's load report (its nominal view) as the
    policy is asked for an iteration, at a fixed `now` so only the predictions differ."""
    make = sch.policy_factory

    def factory(r):
        inner = make(r)

        class Spy:
            def schedule(self, rr):
                rep = rr.report(0.0)
                seen.append((rr.index, rr.step, rep.waiting, rep.running, rep.queued_work_s, rep.running_work_s,
                             rep.predicted_finish_s))
                return inner.schedule(rr)
        return Spy()
    sch.policy_factory = factory
    return sch


@pytest.mark.parametrize("policy", ["vllm", "lpt-engine"])
def test_only_the_clock_sees_the_noise(local300, policy):
    """All requests arrive at t = 0 with known lengths, and these policies decide by each replica's
    state alone: with noise every replica makes exactly the same decisions and predicts exactly the
    same (nominal) work at each step (only the replicas' interleaving in time moves); every iteration
    lasts its nominal time x that replica's bias x a factor drawn from its own stream."""
    cl, reqs = local300
    log_plain, log_noisy = [], []
    plain = simulate(cl, _spy_reports(build_scheduler(policy, cl, reqs), log_plain), reqs)
    noise = CostNoise(0.05, seed=4)
    noisy = simulate(cl, _spy_reports(build_scheduler(policy, cl, reqs), log_noisy), reqs, noise=noise)
    assert sorted(log_noisy, key=lambda e: e[0]) == sorted(log_plain, key=lambda e: e[0])    # stable: per replica
    assert len(log_plain) > 1000 and log_noisy != log_plain
    assert [(s.id, s.replica, s.predicted_first, s.work_s) for s in noisy.sequences] == \
           [(s.id, s.replica, s.predicted_first, s.work_s) for s in plain.sequences]
    assert noisy.makespan_s != plain.makespan_s
    draws = noise.fresh()
    for r, p in zip(noisy.replicas, plain.replicas):
        assert [(x.kind, x.batch, x.tokens, x.attn_sq, x.ctx_tokens) for x in r.records] == \
               [(x.kind, x.batch, x.tokens, x.attn_sq, x.ctx_tokens) for x in p.records]
        for x in r.records:
            assert x.end_s - x.start_s == pytest.approx(x.predicted_s(r.cost) * draws.factor(r.index), rel=1e-9)
        ratios = [(x.end_s - x.start_s) / x.predicted_s(r.cost) / noise.bias(r.index) for x in r.records]
        assert statistics.fmean(ratios) == pytest.approx(1.0, abs=0.01)        # jitter of mean 1 around the bias
        assert noisy.extra["cost_noise"]["bias"][r.name] == noise.bias(r.index)


def test_the_plan_never_sees_the_noise(local300):
    """The planner simulates its candidates itself, without noise: the hybrid's plan is the same."""
    cl, reqs = local300
    a = build_scheduler("hybrid", cl, reqs, method="lpt")
    simulate(cl, a, reqs, noise=CostNoise(0.3, 1))
    b = build_scheduler("hybrid", cl, reqs, method="lpt")
    assert a.info["plan"].assignment == b.info["plan"].assignment


# -- the command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["-1", "nan", "inf", "x"])
def test_cli_rejects_a_bad_cost_noise_in_one_line(capsys, value):
    assert main(["simulate", "--config", "local", "--limit", "20", "--cost-noise", value]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "--cost-noise" in err and f"got '{value}'" in err


def test_cli_cost_noise_zero_is_the_default_and_seeds_the_noise(tmp_path, capsys):
    def run(*extra: str) -> dict:
        path = tmp_path / "m.json"
        # no --limit: with one, --seed would also pick the sample
        assert main(["simulate", "--config", "local", "--policy", "vllm", "--json", str(path), *extra]) == 0
        return json.loads(path.read_text())

    plain, zero = run(), run("--cost-noise", "0")
    assert plain.pop("wall_s") is not None and zero.pop("wall_s") is not None
    assert zero == plain and plain["cost_noise"] == 0.0
    a, b = run("--cost-noise", "0.05", "--seed", "1"), run("--cost-noise", "0.05", "--seed", "1")
    c = run("--cost-noise", "0.05", "--seed", "2")
    assert a["makespan_s"] == b["makespan_s"] != c["makespan_s"] and a["cost_noise"] == 0.05
    capsys.readouterr()
    # a --seed is used by the noise; without noise (and for a policy that draws nothing) it still is not
    assert main(["simulate", "--config", "local", "--policy", "vllm", "--cost-noise", "0", "--seed", "1"]) == 2
    assert "--seed 1 changes nothing here" in capsys.readouterr().err
