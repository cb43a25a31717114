"""Replica state machine: exact timing of simple cases, KV preemption by recompute, limits."""
import pytest

from hybrid_ray.config import ClusterSpec
from hybrid_ray.policies import build_scheduler
from hybrid_ray.replica import DECODE, PREFILL, Iteration, ReplicaState, SchedulingError, Sequence
from hybrid_ray.simulator import simulate
from hybrid_ray.workload import Request

from helpers import COST, cluster


def run(cl: ClusterSpec, reqs, policy="baseline"):
    return simulate(cl, build_scheduler(policy, cl, reqs), reqs)


def test_single_request_timing_is_prefill_plus_decodes():
    cl = cluster(count=1)
    rec = run(cl, [Request("a", 100, 5)])
    s = rec.sequences[0]
    pre = COST.prompt_prefill_time([100])
    assert s.first_token_s == pytest.approx(pre)
    # four decode steps; context grows 101, 102, 103, 104
    dec = sum(COST.decode_time(1, 101 + k) for k in range(4))
    assert s.finish_s == pytest.approx(pre + dec)
    kinds = [r.kind for r in rec.replicas[0].records]
    assert kinds == [PREFILL] + [DECODE] * 4


def test_one_token_request_finishes_at_prefill():
    rec = run(cluster(count=1), [Request("a", 10, 1)])
    s = rec.sequences[0]
    assert s.finish_s == s.first_token_s == pytest.approx(COST.prompt_prefill_time([10]))


def test_prefill_first_stalls_decode_and_batches_prompts():
    cl = cluster(count=1, max_batch=2)
    reqs = [Request("a", 50, 3), Request("b", 60, 3), Request("c", 70, 2)]
    rec = run(cl, reqs)
    r = rec.replicas[0].records
    # a and b prefill together (2 slots), decode twice, then c is prefilled alone and decoded once
    assert [(x.kind, x.prefills, x.batch) for x in r] == [
        (PREFILL, 2, 0), (DECODE, 0, 2), (DECODE, 0, 2), (PREFILL, 1, 0), (DECODE, 0, 1)]
    fin = {s.id: s.finish_s for s in rec.sequences}
    assert fin["a"] == fin["b"] < fin["c"]


def test_kv_pressure_preempts_newest_and_recomputes():
    # KV of 40 tokens: two 10-token prompts growing to 25 tokens each cannot both stay.
    cl = cluster(count=1, max_batch=4, kv=40)
    reqs = [Request("a", 10, 15), Request("b", 10, 15)]
    rec = run(cl, reqs)
    seqs = {s.id: s for s in rec.sequences}
    assert seqs["b"].preemptions >= 1 and seqs["a"].preemptions == 0
    assert all(s.generated == s.req.output_tokens for s in rec.sequences)
    assert seqs["a"].finish_s < seqs["b"].finish_s
    # b's recompute prefill covers its prompt plus the tokens it had generated
    recompute = [x for x in rec.replicas[0].records if x.kind == PREFILL and x.tokens > 10]
    assert recompute and all(x.tokens <= 10 + 15 - 1 for x in recompute)


def test_begin_rejects_over_batch_and_bad_chunk():
    spec = cluster(count=1, max_batch=1).replicas()[0]
    r = ReplicaState(spec)
    a, b = Sequence(Request("a", 10, 3), 3), Sequence(Request("b", 10, 3), 3)
    r.add([a, b])
    with pytest.raises(SchedulingError, match="batch"):
        r.begin(Iteration(PREFILL, [(a, 10), (b, 10)]))
    r2 = ReplicaState(spec)
    c = Sequence(Request("c", 10, 3), 3)
    r2.add([c])
    with pytest.raises(SchedulingError, match="chunk"):
        r2.begin(Iteration(PREFILL, [(c, 11)]))


def test_take_back_only_unstarted():
    spec = cluster(count=1, max_batch=1).replicas()[0]
    r = ReplicaState(spec)
    seqs = [Sequence(Request(f"r{i}", 10, 3), 3) for i in range(4)]
    r.add(seqs)
    it = r.begin(Iteration(PREFILL, [(seqs[0], 10)]))
    r.complete(it, 0.0, 1.0)
    got = r.take_back(10)
    assert [s.id for s in got] == ["r3", "r2", "r1"]
    assert r.waiting == [] and list(r.running) == ["r0"]


def test_chunked_prefill_splits_long_prompt():
    cl = cluster(count=1, max_batch=4)
    cl = ClusterSpec(cl.name, cl.groups, policy={"chunked": {"token_budget": 64}})
    rec = run(cl, [Request("a", 200, 4)], policy="chunked")
    recs = rec.replicas[0].records
    assert [x.tokens for x in recs[:4]] == [64, 64, 64, 8]
    assert rec.sequences[0].first_token_s == pytest.approx(recs[3].end_s)
    assert rec.sequences[0].generated == 4
