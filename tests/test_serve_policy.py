"""The faithful baselines of what operators run: `vllm` (v1 engines) and `serve` (Ray Serve's router)."""
from __future__ import annotations

import random

import pytest

from hybrid_ray.config import load_cluster
from hybrid_ray.errors import ConfigError
from hybrid_ray.planning import build_scheduler
from hybrid_ray.policies.serve import ServeDispatcher
from hybrid_ray.replica import LoadReport, Sequence
from hybrid_ray.simulator import simulate
from hybrid_ray.workload import Request, load_gsm8k

from helpers import cluster, random_requests


def loads(n: int) -> list[LoadReport]:
    return [LoadReport(i, f"r{i}", 0.0, 0, 0, 0, 0.0, 0.0, 0.0) for i in range(n)]


def seqs(n: int) -> list[Sequence]:
    return [Sequence(Request(f"q{i}", 10, 10), 10) for i in range(n)]


def test_serve_bounds_each_replica_and_holds_the_rest_in_fifo_order():
    d = ServeDispatcher({0: 3, 1: 2, 2: 3}, seed=1)
    batch = seqs(20)
    out = d.admit(batch, loads(3))
    assert len(out) == 8                                   # 3 + 2 + 3 slots, the other 12 wait
    assert [s.id for s, _ in out] == [f"q{i}" for i in range(8)]                  # FIFO
    per = {i: sum(1 for _, t in out if t == i) for i in range(3)}
    assert per == {0: 3, 1: 2, 2: 3}
    # one request finishes on replica 1: the next in line goes there, the only replica with room
    first_on_1 = next(s for s, t in out if t == 1)
    more = d.on_finished(1, [first_on_1], loads(3))
    assert [(s.id, t) for s, t in more] == [("q8", 1)]


def test_serve_picks_the_shorter_of_two_queues_and_is_deterministic():
    picks = []
    for _ in range(2):
        d = ServeDispatcher({i: 100 for i in range(4)}, seed=7)
        picks.append([t for _, t in d.admit(seqs(40), loads(4))])
    assert picks[0] == picks[1]
    counts = [picks[0].count(i) for i in range(4)]
    assert max(counts) - min(counts) <= 3                  # two choices keep queues close
    assert sum(counts) == 40


def test_serve_knob_checked_and_defaults_to_twice_the_batch():
    cl = cluster(count=2, max_batch=4)
    sch = build_scheduler("serve", cl, [])
    assert sch.dispatcher.max_ongoing == {0: 8, 1: 8}
    bad = cl.__class__(cl.name, cl.groups, policy={"serve": {"max_ongoing_requests": -1}})
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        build_scheduler("serve", bad, [])


@pytest.mark.parametrize("policy", ["vllm", "serve"])
def test_faithful_baselines_finish_every_request(policy):
    rng = random.Random(3)
    reqs = random_requests(rng, 80, arrivals=True)
    cl = cluster(count=3, max_batch=4, kv=4000, max_batched_tokens=256)
    rec = simulate(cl, build_scheduler(policy, cl, reqs), reqs)
    assert sorted(s.id for s in rec.sequences if s.finish_s >= 0) == sorted(q.id for q in reqs)
    assert all(s.generated == s.req.output_tokens for s in rec.sequences)


def test_vllm_engine_chunks_prefill_at_the_groups_token_budget():
    """vLLM v1 always chunks: a prompt longer than max_num_batched_tokens takes several iterations."""
    cl = cluster(count=1, max_batch=4, kv=20_000, max_batched_tokens=128)
    reqs = [Request("long", 1000, 5)]
    rec = simulate(cl, build_scheduler("vllm", cl, reqs), reqs)
    prefills = [r for r in rec.replicas[0].records if r.tokens]
    assert len(prefills) == 8 and max(r.tokens for r in prefills) == 128      # ceil(1000 / 128)


def test_hybrid_beats_the_faithful_baselines_on_the_paper_config():
    cl = load_cluster("paper_llama65b")
    reqs = load_gsm8k()
    span = {p: max(s.finish_s for s in simulate(cl, build_scheduler(p, cl, reqs), reqs).sequences)
            for p in ("vllm", "serve", "hybrid")}
    assert span["hybrid"] < span["serve"] < span["vllm"]


# -- serve-llm: Ray Serve LLM's default deployment (max_ongoing_requests 1e9) -------------------------

def test_serve_llm_takes_ray_serve_llms_default_bound():
    from hybrid_ray.policies.serve import SERVE_LLM_MAX_ONGOING_REQUESTS
    from hybrid_ray.schedulers import DESCRIPTIONS
    assert SERVE_LLM_MAX_ONGOING_REQUESTS == int(1e9)       # ray/llm/_internal/serve/constants.py
    cl = cluster(count=3, max_batch=4)
    sch = build_scheduler("serve-llm", cl, [])
    assert sch.name == "serve-llm" and sch.dispatcher.max_ongoing == {i: int(1e9) for i in range(3)}
    assert "tuned" in DESCRIPTIONS["serve"] and "default" in DESCRIPTIONS["serve-llm"]


def test_serve_llm_never_bounds_replica_queues():
    """A batch job: every request is routed at t = 0 (none waits centrally), by two random choices
    on the replicas' ongoing counts; completions route nothing more."""
    cl = load_cluster("paper_llama65b")
    reqs = load_gsm8k()
    sch = build_scheduler("serve-llm", cl, reqs, seed=5)
    d = sch.dispatcher
    calls: list[tuple[str, int, int]] = []
    admit, finished = d.admit, d.on_finished

    def spy_admit(batch, ls):
        out = admit(batch, ls)
        calls.append(("admit", len(batch), len(out)))
        return out

    def spy_finished(i, done, ls):
        out = finished(i, done, ls)
        calls.append(("finished", len(done), len(out)))
        return out

    d.admit, d.on_finished = spy_admit, spy_finished
    rec = simulate(cl, sch, reqs)
    assert calls[0] == ("admit", 1319, 1319) and len(d.queue) == 0
    assert all(c[0] == "finished" and c[2] == 0 for c in calls[1:]) and len(calls) > 100
    per = [sum(1 for s in rec.sequences if s.replica == r.name) for r in rec.replicas]
    assert sum(per) == 1319 and max(per) - min(per) <= 4              # balanced by count, not by work
    # the tuned bound holds most of the batch back centrally
    tuned = build_scheduler("serve", cl, reqs, seed=5)
    assert len(tuned.dispatcher.admit([tuned.make_sequence(q) for q in reqs], loads(4))) == 4 * 2 * 8


def test_serve_llm_draws_depend_on_the_seed():
    cl = cluster(count=4, max_batch=4)
    reqs = [Request(f"q{i}", 10, 10) for i in range(40)]
    picks = {}
    for seed in (1, 1, 2):
        sch = build_scheduler("serve-llm", cl, reqs, seed=seed)
        picks.setdefault(seed, []).append([t for _, t in sch.dispatcher.admit(
            [sch.make_sequence(q) for q in reqs], loads(4))])
    assert picks[1][0] == picks[1][1] != picks[2][0]
