"""Prefix caching: chained block keys, the cache's reference counts and LRU, the replica's hits and KV
accounting (exact against a from-scratch recount), validation of ``hash_ids``, the prefix workloads,
and that nothing changes without ``hash_ids``."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from hybrid_ray.cli import main
from hybrid_ray.config import ClusterSpec, parse_cluster
from hybrid_ray.errors import ConfigError, WorkloadError
from hybrid_ray.metrics import format_summary, summarize
from hybrid_ray.planning import build_scheduler
from hybrid_ray.prefix_cache import HASH_BLOCK_TOKENS, PrefixCache, block_keys
from hybrid_ray.prefix_workloads import doc_qa, few_shot, parse_spec, write_jsonl
from hybrid_ray.replica import FINISHED, PREFILL, PREFILLING, Iteration, ReplicaState, Sequence
from hybrid_ray.simulator import simulate
from hybrid_ray.workload import Request, load_file, load_workload, prefix_requests

from helpers import cluster, random_requests


def caching(cl: ClusterSpec, on: bool = True, block_size: int | None = None) -> ClusterSpec:
    return replace(cl, groups=tuple(replace(g, prefix_caching=on, block_size=block_size or g.block_size)
                                    for g in cl.groups))


def run(cl, reqs, policy="vllm"):
    return simulate(cl, build_scheduler(policy, cl, reqs), reqs)


# -- keys ---------------------------------------------------------------------------------------

def test_keys_chain_over_hash_ids():
    a = block_keys([1, 2, 3], 1536, 16)
    b = block_keys([1, 2, 4], 1536, 16)
    assert len(a) == len(b) == 96 and len(set(a)) == 96
    assert a[:64] == b[:64] and not set(a[64:]) & set(b)        # the third 512-block differs
    c = block_keys([9, 2, 3], 1536, 16)
    assert not set(a) & set(c)                                    # a chain: a later equal id shares nothing
    assert all(isinstance(k, int) for k in a)


def test_keys_only_full_blocks_inside_the_prompt_and_covered_by_ids():
    assert len(block_keys([1, 2], 1000, 16)) == 62                 # 1000 // 16: the partial block is not cached
    assert len(block_keys([1], 2000, 16)) == 32                    # ids cover only the first 512 tokens
    assert block_keys(None, 2000, 16) == () == block_keys([], 2000, 16)
    # a block straddling two 512-blocks belongs to the chain up to the one holding its last token
    x, y = block_keys([1, 2], 1024, 48), block_keys([1, 3], 1024, 48)
    assert x[:10] == y[:10] and x[10] != y[10]                    # block 10 = tokens 480..527


# -- the cache ----------------------------------------------------------------------------------

def test_refcounts_lru_and_eviction_of_free_blocks_only():
    pc = PrefixCache(capacity_blocks=4, block_size=16)
    assert pc.insert_run([10, 11, 12], 0, 3) == 3 and len(pc) == 3 and pc.free_blocks == 0
    assert pc.match([10, 11, 12, 13]) == 3 and pc.match([10, 11, 12], limit=2) == 2 and pc.match([11]) == 1
    assert pc.acquire([10, 11], 2) == 0 and pc.refcount(10) == 2
    assert pc.release([10, 11, 12], 3) == 1 and pc.lru() == [12]   # 10 and 11 still held once
    assert pc.evict(5) == 1 and 12 not in pc and len(pc) == 2      # only the free one goes
    assert pc.release([10, 11], 2) == 2 and pc.lru() == [11, 10]   # the tail is evicted first
    assert pc.free_hits([10, 11], 2) == 2
    assert pc.acquire([10], 1) == 1 and pc.lru() == [11] and pc.refcount(10) == 1
    assert pc.insert(20) and pc.insert(21) and len(pc) == 4
    assert pc.insert(22) and 11 not in pc                          # full: the oldest free block makes room
    assert not pc.insert(23) and 23 not in pc                      # full of held blocks: declined
    assert not pc.insert(10)                                       # cached already: the computer keeps its copy
    v = pc.version
    pc.acquire([10], 1)                                            # a held block: nothing a match sees changes
    assert pc.version == v


# -- the replica --------------------------------------------------------------------------------

def test_second_request_skips_the_shared_full_blocks():
    cl = cluster(count=1)
    reqs = [Request("a", 1000, 5, 0.0, hash_ids=(1, 2)), Request("b", 1000, 5, 5.0, hash_ids=(1, 3)),
            Request("c", 1000, 5, 10.0, hash_ids=(1, 2)), Request("d", 1024, 5, 15.0, hash_ids=(7, 8)),
            Request("e", 1024, 5, 20.0, hash_ids=(7, 8))]
    rec = run(cl, reqs)
    by = {s.id: s for s in rec.sequences}
    assert [by[k].cached_tokens for k in "abcde"] == [0, 512, 992, 0, 1008]
    records = rec.replicas[0].records
    pre = {x.start_s: x for x in records if x.kind == PREFILL}
    first = {k: min(t for t in pre if t >= by[k].req.arrival_s) for k in "abcde"}
    assert [pre[first[k]].tokens for k in "abcde"] == [1000, 488, 8, 1024, 16]   # always >= 1 token computed
    # a chunk after a cached prefix is priced as a continuation: attention over the cached context
    assert pre[first["b"]].attn_sq == 488 * (2 * 512 + 488)
    assert pre[first["e"]].attn_sq == 16 * (2 * 1008 + 16)
    off = run(caching(cl, False), reqs)
    assert all(s.cached_tokens == 0 for s in off.sequences)
    assert [x.tokens for x in off.replicas[0].records if x.kind == PREFILL] == [1000, 1000, 1000, 1024, 1024]
    assert max(s.finish_s for s in rec.sequences) < max(s.finish_s for s in off.sequences)
    sm = summarize(rec)
    assert sm.cached_prompt_tokens == 512 + 992 + 1008
    assert sm.prefix_hit_rate == pytest.approx((512 + 992 + 1008) / 5048)
    assert "prefix cache hits" in format_summary(sm) and "prefix cache hits" not in format_summary(summarize(off))
    assert sm.to_dict()["cached_prompt_tokens"] == 2512


def _state(kv=3000, bs=16, on=True):
    cl = caching(cluster(count=1, max_batch=8, kv=kv), on, bs)
    return ReplicaState(cl.replicas()[0])


def _step(r, it):
    assert r.begin(it) is it
    return r.complete(it, 0.0, 1.0)


def test_kv_counts_shared_blocks_once_and_evictable_blocks_as_free():
    r = _state(kv=3000)
    a = Sequence(Request("a", 1024, 3, hash_ids=(1, 2)), 3)
    r.add([a])
    _step(r, Iteration(PREFILL, [(a, 1024)]))
    assert a.held == 64 and r.kv_used == 1025
    b = Sequence(Request("b", 1100, 3, hash_ids=(1, 2, 3)), 3)
    r.add([b])
    assert r.prefill_rest(b) == 1100 - 1024 and r.admit_kv(b) == 0   # a holds the blocks
    _step(r, Iteration("mixed", [(b, 76)], decode=True))
    assert r.kv_used == 1026 + 76 + 1                                 # the shared 1024 tokens once
    assert r.records[-1].ctx_tokens == 1025                           # a's context, read in full
    _step(r, Iteration("decode", decode=True))
    assert r.records[-1].ctx_tokens == 1026 + 1101                    # each reads the shared prefix
    while r.running:
        _step(r, Iteration("decode", decode=True))
    assert r.kv_used == 0 and r.kv_free == 3000
    assert r.prefix.free_blocks == 68 and r.prefix.used_blocks == 0   # cached, evictable, counted free
    c = Sequence(Request("c", 1030, 3, hash_ids=(1, 2, 5)), 3)
    r.add([c])
    assert r.prefill_rest(c) == 6 and r.admit_kv(c) == 1024           # its hits leave the evictable pool
    _step(r, Iteration(PREFILL, [(c, 6)]))
    assert c.cached_tokens == 1024 and r.kv_used == 1024 + 6 + 1 and r.prefix.free_blocks == 4


def test_a_chunk_hits_blocks_cached_earlier_in_the_same_iteration():
    r = _state(kv=5000)
    a = Sequence(Request("a", 1024, 3, hash_ids=(1, 2)), 3)
    b = Sequence(Request("b", 1100, 3, hash_ids=(1, 2, 3)), 3)
    r.add([a, b])
    assert r.prefill_rest(b) == 1100                                  # nothing cached yet
    it = Iteration(PREFILL, [(a, 1024), (b, 1100)])
    _step(r, it)                                                      # vLLM caches a's blocks as it schedules them
    assert it.prefill[1] == (b, 76) and it.tokens == 1100 and b.cached_tokens == 1024
    assert it.attn_sq == 1024 * 1024 + 76 * (2 * 1024 + 76)
    assert r.kv_used == 1024 + 76 + 2 and b.held == 68 and a.held == 64


def test_eviction_when_the_cache_is_full():
    # 3,000 tokens of KV: after two 1,024-token documents, a third evicts the first one's blocks (its
    # tail first), so a later question on the first document hits only what is left of it
    reqs = [Request(f"d{k}", 1024, 2, 10.0 * k, hash_ids=(100 + k, 200 + k)) for k in range(3)]
    reqs.append(Request("again", 1100, 2, 40.0, hash_ids=(100, 200, 999)))
    small = run(caching(cluster(count=1, kv=3000)), reqs)
    big = run(caching(cluster(count=1, kv=100_000)), reqs)
    hit = {s.id: s.cached_tokens for s in small.sequences}
    assert {s.id: s.cached_tokens for s in big.sequences}["again"] == 1024
    assert small.replicas[0].prefix.evictions > 0
    assert 0 < hit["again"] < 1024                                     # its prefix outlived its tail
    r = small.replicas[0]
    assert r.kv_used == 0 and r.prefix.free_blocks * 16 <= r.kv_capacity


def test_recompute_preemption_releases_blocks_and_readmission_hits():
    r = _state(kv=2100)
    a = Sequence(Request("a", 1024, 50, hash_ids=(1, 2)), 50)
    b = Sequence(Request("b", 1024, 50, hash_ids=(3, 4)), 50)
    r.add([a, b])
    _step(r, Iteration(PREFILL, [(a, 1024), (b, 1024)]))
    assert a.held == b.held == 64
    while b.preemptions == 0:                                         # KV pressure preempts b (the newest)
        _step(r, Iteration("decode", decode=True))
    assert b.held == 0 and r.prefix.free_blocks == 64 and r.waiting[0] is b
    # the policy sees b's cached prompt: only its generated tokens (and the last block) are recomputed
    assert r.prefill_rest(b) == b.prefill_target - 1024 and b.cached_tokens == 0   # the first admission's hit


def test_prefix_caching_off_and_block_size_in_the_yaml(tmp_path):
    base = {"groups": [{"name": "g", "count": 1, "max_batch_size": 4, "kv_capacity_tokens": 1000,
                        "cost_model": {"prefill": {"floor_s": 0.01, "base_s": 0.0, "per_token_s": 1e-5},
                                       "decode": {"base_s": 0.01, "per_seq_s": 0.0, "per_ctx_token_s": 0.0}}}]}
    g = parse_cluster(base, "c.yaml").groups[0]
    assert (g.prefix_caching, g.block_size) == (True, 16)            # vLLM v1's defaults
    base["groups"][0].update(prefix_caching=False, block_size=32)
    c = parse_cluster(base, "c.yaml")
    assert (c.groups[0].prefix_caching, c.groups[0].block_size) == (False, 32)
    assert parse_cluster(c.to_dict(), "d.yaml").groups == c.groups
    assert ReplicaState(c.replicas()[0]).prefix is None
    for key, value, needle in (("prefix_caching", "yes", "groups[0].prefix_caching: expected true or false, got 'yes'"),
                               ("block_size", 0, "groups[0].block_size: expected an integer >= 1, got 0"),
                               ("prefix_cache", True, "unknown key 'prefix_cache' (did you mean 'prefix_caching'?)")):
        bad = {"groups": [dict(base["groups"][0], **{key: value})]}
        with pytest.raises(ConfigError, match="c.yaml") as e:
            parse_cluster(bad, "c.yaml")
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_real_engines_without_a_prefix_cache_model_none():
    from hybrid_ray.engines.base import engine_prefix_caching
    from hybrid_ray.engines.emulated import EmulatedEngine
    r = _state()
    engine_prefix_caching(EmulatedEngine(1.0), r)
    assert r.prefix is not None
    engine_prefix_caching(object(), r)                                # no ``prefix_caching``: off
    assert r.prefix is None


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, needle", [
    ('"abc"', "hash_ids must be a list of integers"),
    ("[1, true]", "hash_ids must be a list of integers"),
    ("[1, 2.5]", "hash_ids must be a list of integers"),
    ("[1, 2, 3]", "hash_ids has 3 entries, but a 600-token prompt has only 2 block(s) of 512 tokens"),
])
def test_bad_hash_ids_name_the_file_and_line(tmp_path, value, needle):
    p = tmp_path / "w.jsonl"
    p.write_text('{"prompt_tokens": 600, "output_tokens": 3, "hash_ids": [1, 2]}\n'
                 f'{{"prompt_tokens": 600, "output_tokens": 3, "hash_ids": {value}}}\n')
    with pytest.raises(WorkloadError) as e:
        load_file(p)
    assert str(e.value).startswith(f"{p} line 2: ") and needle in str(e.value)


def test_hash_ids_checked_against_a_prompt_counted_from_its_text(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_text('{"prompt": "a short prompt", "output_tokens": 3, "hash_ids": [1, 2]}\n')
    with pytest.raises(WorkloadError, match=r"line 1: hash_ids has 2 entries.*counted from its text"):
        load_file(p)


def test_hash_ids_in_csv_and_the_cli_error(tmp_path, capsys):
    p = tmp_path / "w.csv"
    p.write_text('prompt_tokens,output_tokens,hash_ids\n600,3,"[1, 2]"\n600,3,\n')
    reqs = load_file(p)
    assert reqs[0].hash_ids == (1, 2) and reqs[1].hash_ids is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_tokens": 100, "output_tokens": 3, "hash_ids": [1, 2]}\n')
    assert main(["simulate", "--workload", str(bad)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"{bad} line 1: hash_ids has 2 entries" in err[0]


# -- workloads ----------------------------------------------------------------------------------

def test_doc_qa_is_seeded_and_shares_documents():
    a, b = doc_qa(300, seed=1, docs=10), doc_qa(300, seed=1, docs=10)
    assert a == b and doc_qa(300, seed=2, docs=10) != a
    for r in a:
        assert 512 + 2000 + 20 <= r.prompt_tokens <= 512 + 8000 + 60 and 20 <= r.output_tokens <= 300
        assert len(r.hash_ids) == -(-r.prompt_tokens // HASH_BLOCK_TOKENS)
    firsts = {r.hash_ids[0] for r in a}
    assert firsts == {a[0].hash_ids[0]}                               # the system prompt
    docs = {r.hash_ids[1] for r in a}
    assert len(docs) <= 10 and len({r.hash_ids[-1] for r in a}) == 300   # each question's own block
    counts = sorted((sum(r.hash_ids[1] == d for r in a) for d in docs), reverse=True)
    assert counts[0] > 3 * counts[-1]                                 # Zipf: a few documents draw most
    f = few_shot(200, seed=3)
    assert f == few_shot(200, seed=3) and len({r.hash_ids[0] for r in f}) <= 8
    assert parse_spec("doc-qa") == ("doc-qa", 3000, 0) and parse_spec("few-shot:50:7") == ("few-shot", 50, 7)
    assert parse_spec("doc-qa:0") is None and parse_spec("doc-qaa") is None
    assert load_workload("doc-qa:40:5") == prefix_requests(doc_qa(40, 5))
    assert load_workload("few-shot:30") == prefix_requests(few_shot(30))


def test_prefix_workload_file_round_trips(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", "doc-qa", 50, 2)
    assert load_file(p) == prefix_requests(doc_qa(50, 2))


def test_doc_qa_vllm_run_hits_and_is_faster_than_without_caching():
    cl = cluster(count=2, max_batch=16, kv=40_000)
    reqs = prefix_requests(doc_qa(200, seed=0, docs=10))
    on, off = summarize(run(cl, reqs)), summarize(run(caching(cl, False), reqs))
    assert on.prefix_hit_rate > 0.5 and off.prefix_hit_rate == 0 and off.cached_prompt_tokens == 0
    assert on.makespan_s < 0.8 * off.makespan_s
    assert on.requests_completed == 200


# -- exactness ----------------------------------------------------------------------------------

def _timeline(rec):
    return ([(s.id, s.first_token_s, s.finish_s, s.preemptions, s.replica) for s in rec.sequences],
            [[(x.start_s, x.end_s, x.kind, x.tokens, x.attn_sq, x.ctx_tokens) for x in r.records]
             for r in rec.replicas])


@pytest.mark.parametrize("policy", ["vllm", "baseline", "hybrid"])
def test_without_hash_ids_caching_changes_nothing(policy):
    rng = random.Random(7)
    reqs = random_requests(rng, 60, arrivals=True)
    cl = cluster(count=2, max_batch=4, kv=600)                        # small KV: preemptions too
    on, off = run(cl, reqs, policy), run(caching(cl, False), reqs, policy)
    assert _timeline(on) == _timeline(off)
    assert summarize(on).cached_prompt_tokens == 0


def _tree_requests(rng: random.Random, n: int) -> list[Request]:
    """Requests over a small prefix tree (a few roots, branches), random lengths and arrivals."""
    out, t = [], 0.0
    for i in range(n):
        ids = [rng.randint(1, 3)]
        for depth in range(rng.randint(0, 3)):
            ids.append(rng.randint(1, 2) if depth < 2 else 1000 + i)
        prompt = rng.randint(512 * (len(ids) - 1) + 1, 512 * len(ids))
        t += rng.expovariate(2.0) if rng.random() < 0.5 else 0.0
        out.append(Request(f"q{i}", prompt, rng.choice((rng.randint(1, 40), rng.randint(100, 400))), t,
                           hash_ids=tuple(ids)))
    return out


def _recount(r: ReplicaState) -> None:
    """The replica's KV and the cache's reference counts, recounted from its sequences."""
    bs, pc = r.block_size, r.prefix
    live = list(r.running.values()) + list(r.prefilling.values())
    holders: dict[int, int] = {}
    own = footprint = 0
    for s in live:
        fp = s.prefilled if s.status == PREFILLING else s.req.prompt_tokens + r.generated(s)
        footprint += fp
        own += fp - s.held * bs
        for k in (s.keys or ())[:s.held]:
            holders[k] = holders.get(k, 0) + 1
    for s in r.waiting:
        assert s.held == 0
    if pc is None:
        assert r.kv_used == footprint
        return
    assert all(pc.refcount(k) == c for k, c in holders.items())
    assert pc.used_blocks == len(holders)
    assert r.kv_used == own + len(holders) * bs
    assert r._shared == footprint - r.kv_used
    assert r.kv_used + pc.free_blocks * bs <= r.kv_capacity


@pytest.mark.parametrize("policy, bs, budget", [("vllm", 16, 8192), ("vllm", 48, 200), ("baseline", 48, 8192),
                                                ("chunked", 7, 8192), ("hybrid", 16, 8192)])
def test_kv_and_refcounts_stay_exact_on_random_prefix_trees(policy, bs, budget, monkeypatch):
    begin, complete = ReplicaState.begin, ReplicaState.complete

    def checked_begin(self, it):
        out = begin(self, it)
        _recount(self)
        return out

    def checked_complete(self, it, start_s, end_s):
        done = complete(self, it, start_s, end_s)
        _recount(self)
        return done

    monkeypatch.setattr(ReplicaState, "begin", checked_begin)
    monkeypatch.setattr(ReplicaState, "complete", checked_complete)
    preempted = evicted = 0
    for seed in range(4):
        rng = random.Random(seed)
        reqs = _tree_requests(rng, 40)
        cl = caching(cluster(count=2, max_batch=6, kv=rng.choice([2500, 3000, 6000]), max_batched_tokens=budget),
                     True, bs)
        rec = run(cl, reqs, policy)
        assert all(s.status == FINISHED and s.generated == s.req.output_tokens for s in rec.sequences)
        for r in rec.replicas:
            assert r.kv_used == 0 and r._shared == 0 and r.prefix.used_blocks == 0
        # every prompt token was computed or a hit (first admissions; a recompute adds its own)
        computed = sum(x.tokens - x.recompute_tokens for r in rec.replicas for x in r.records)
        hits = sum(s.cached_tokens for s in rec.sequences)
        if not any(s.preemptions for s in rec.sequences):
            assert computed + hits == sum(s.req.prompt_tokens for s in rec.sequences)
        assert hits > 0
        preempted += sum(s.preemptions for s in rec.sequences)
        evicted += sum(r.prefix.evictions for r in rec.replicas)
    assert preempted and evicted                                      # both paths ran
