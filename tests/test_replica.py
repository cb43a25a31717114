"""Replica state machine: exact timing of simple cases, KV preemption by recompute, limits."""
import pytest

from hybrid_ray.config import ClusterSpec
from hybrid_ray.planning import build_scheduler
from hybrid_ray.replica import DECODE, MIXED, PREFILL, Iteration, ReplicaState, SchedulingError, Sequence
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


def _replica(max_batch=4, kv=1_000):
    r = ReplicaState(cluster(count=1, max_batch=max_batch, kv=kv).replicas()[0])
    seqs = [Sequence(Request(f"q{i}", 10, 5), 5) for i in range(3)]
    r.add(seqs)
    return r, seqs


def _running(r, seqs):
    it = r.begin(Iteration(PREFILL, [(seqs[0], 10)]))
    r.complete(it, 0.0, 1.0)
    return seqs[0]


@pytest.mark.parametrize("make, match", [
    # a prompt labelled as a decode step would be priced as one
    (lambda s: Iteration(DECODE, [(s[1], 10)], decode=True), r"decode iteration holds a prefill chunk of q1"),
    (lambda s: Iteration(PREFILL, [(s[1], 10)], decode=True), r"prefill iteration with decode=True"),
    (lambda s: Iteration(PREFILL, [], decode=False), r"prefill iteration holds no prefill chunk"),
    (lambda s: Iteration(MIXED, [], decode=True), r"mixed iteration needs both"),
    (lambda s: Iteration(MIXED, [(s[1], 10)], decode=False), r"mixed iteration needs both"),
    (lambda s: Iteration(DECODE, decode=False), r"decode iteration without decode=True"),
    (lambda s: Iteration("burst", decode=True), r"unknown iteration kind"),
    (lambda s: Iteration(MIXED, [(s[1], 4), (s[1], 4)], decode=True), r"q1 has two chunks"),
    (lambda s: Iteration(MIXED, [(s[0], 1)], decode=True), r"q0 is running, cannot prefill"),
])
def test_begin_checks_contents_against_kind(make, match):
    r, seqs = _replica()
    _running(r, seqs)
    with pytest.raises(SchedulingError, match=r"^r?[\w-]+: .*" + match):
        r.begin(make(seqs))


def test_begin_names_replica_and_rejects_foreign_sequences():
    r, seqs = _replica()
    other, theirs = _replica()
    with pytest.raises(SchedulingError, match=rf"^{r.name}: q0 is not in this replica's waiting queue"):
        r.begin(Iteration(PREFILL, [(seqs[1], 10), (theirs[0], 10)]))   # same id, another replica's object
    r2, seqs2 = _replica()
    r2.take_back(1)                                                     # q2 left the queue
    with pytest.raises(SchedulingError, match="q2 is not in this replica's waiting queue"):
        r2.begin(Iteration(PREFILL, [(seqs2[0], 10), (seqs2[2], 10)]))
    r3, seqs3 = _replica()
    _running(r3, seqs3)
    with pytest.raises(SchedulingError, match="cannot preempt q0 .running elsewhere"):
        r.begin(Iteration(DECODE, decode=True, preempt=[seqs3[0]]))
    with pytest.raises(SchedulingError, match="decode iteration with nothing running"):
        ReplicaState(r.spec).begin(Iteration(DECODE, decode=True))


def test_recompute_prefill_counts_its_tokens_in_the_record():
    r, seqs = _replica()
    a = _running(r, seqs)
    for t in range(2):                                           # two decode steps: a holds 3 tokens
        r.complete(r.begin(Iteration(DECODE, decode=True)), 1.0 + t, 2.0 + t)
    it = r.begin(Iteration(DECODE, decode=True, preempt=[a]))   # preempting the only runner empties it
    assert it is None and a.generated == 3 and r.waiting[0] is a and a.prefill_target == 13
    it = r.begin(Iteration(PREFILL, [(a, 13), (seqs[1], 10)]))
    r.complete(it, 3.0, 4.0)
    rec = r.records[-1]
    assert (rec.kind, rec.tokens, rec.recompute_tokens, rec.outputs) == (PREFILL, 23, 13, 2)
    assert rec.attn_sq == 13 ** 2 + 10 ** 2
    assert a.generated == 4                                      # the recompute prefill yielded a's 4th token
    r.complete(r.begin(Iteration(DECODE, decode=True)), 4.0, 5.0)
    assert r.records[-1].outputs == 2 and r.records[-1].recompute_tokens == 0


def test_kv_preemption_relabels_a_mixed_step_by_what_is_left():
    """The mixed step's only chunk belongs to the newest admitted sequence, which KV pressure
    preempts: what runs is a decode step, and it is priced and recorded as one."""
    r = ReplicaState(cluster(count=1, max_batch=4, kv=22).replicas()[0])
    a, b = Sequence(Request("a", 10, 8), 8), Sequence(Request("b", 10, 8), 8)
    r.add([a, b])
    r.complete(r.begin(Iteration(PREFILL, [(a, 10)])), 0.0, 1.0)                # a runs: KV 11
    r.complete(r.begin(Iteration(MIXED, [(b, 5)], decode=True)), 1.0, 2.0)     # KV 12 + 5
    it = r.begin(Iteration(MIXED, [(b, 5)], decode=True))                      # 17 + 1 + 5 + 1 > 22
    assert it.kind == DECODE and it.prefill == [] and it.batch == 1
    assert b.preemptions == 1 and r.waiting[0] is b
    assert it.duration(r.cost) == r.cost.decode_time(1, 12)


def _finishing_by_walk(r: ReplicaState, horizon: int) -> list[int]:
    """The per-step counts as the Lagrangian rule used to compute them: a walk over the batch."""
    out = [0] * (horizon + 1)
    for s in r.running.values():
        rem = s.predicted_output - s.generated + s.synced_step - r.step
        if rem <= horizon:
            out[rem - 1 if rem > 1 else 0] += 1
    return out


@pytest.mark.parametrize("seed", range(6))
def test_kept_finishing_counts_equal_a_walk_over_the_batch_through_preemptions_and_early_stops(seed):
    """``ReplicaState.finishing`` is kept as sequences start and leave (O(horizon) per decision);
    through admissions, decode steps, predictions that are too short or too long, recompute
    preemptions, early stops and a lost replica, it equals a walk over the running batch."""
    import random

    rng = random.Random(seed)
    r = ReplicaState(cluster(count=1, max_batch=16, kv=100_000).replicas()[0])
    seqs = []
    for i in range(60):
        out = rng.randint(1, 40)
        s = Sequence(Request(f"q{i}", rng.randint(1, 30), out), max(1, out + rng.randint(-15, 15)))
        seqs.append(s)
    r.add(seqs)
    checked = 0
    t = 0.0
    for _ in range(400):
        horizon = rng.choice([1, 4, 32])
        assert r.finishing(horizon) == _finishing_by_walk(r, horizon)
        checked += bool(r.running)
        if r.running and rng.random() < 0.1:       # an engine stops one early (EOS)
            r.finish_early(rng.choice(list(r.running.values())), t)
            continue
        preempt = [rng.choice(list(r.running.values()))] if r.running and rng.random() < 0.1 else []
        free = r.free_slots + len(preempt)
        admit = [(s, s.prefill_target) for s in r.waiting[:min(free, rng.randint(0 if r.running else 1, 3))] if s not in preempt]
        if admit:
            it = Iteration(MIXED if r.running else PREFILL, admit, decode=bool(r.running), preempt=preempt)
        elif r.running:
            it = Iteration(DECODE, decode=True, preempt=preempt)
        else:
            break
        it = r.begin(it)
        if it is not None:
            r.complete(it, t, t + 0.01)
        t += 0.01
        if rng.random() < 0.01:                        # replica lost: everything requeued
            r.add(r.drain_unfinished())
    assert checked > 50
