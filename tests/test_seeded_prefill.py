"""A seeded request's prefill is never split on an engine that cannot rewind its generator.

vLLM rewinds a seeded request's ``torch.Generator`` after every step that prefills only part of its
prompt (``set_offset``); a CPU generator has no offset and raises. ``ReplicaState.whole_seeded``
(set from the engine, ``engines.base.whole_seeded_prefill``) makes such sequences be prefilled in
one piece: ``begin`` rejects a partial chunk, and every policy cuts its chunks through
``ReplicaState.prefill_chunk``. Checked here on the state machine, in process, for the chunking
policies (the Lagrangian rule with chunked mixed insertions and its start-up program, and
Sarathi-style chunked prefill), with seeded prompts longer than the token budget too.
"""
from __future__ import annotations

import random

import pytest

from hybrid_ray.engines.base import whole_seeded_prefill
from hybrid_ray.payload import Payload, SamplingSpec
from hybrid_ray.policies.chunked import ChunkedPrefill
from hybrid_ray.policies.lagrangian import LagrangianPolicy
from hybrid_ray.replica import MIXED, PREFILL, Iteration, ReplicaState, SchedulingError, Sequence
from hybrid_ray.simulator import start_iteration
from hybrid_ray.workload import Request

from helpers import cluster


def _req(rid: str, prompt: int, out: int, seed: int | None = None, temperature: float = 0.8) -> Request:
    sp = SamplingSpec(max_tokens=out, temperature=temperature, seed=seed, ignore_eos=True)
    return Request(rid, prompt, out, payload=Payload(tuple(range(3, 3 + prompt)), sp))


def _state(whole: bool, budget: int = 128, batch: int = 8, kv: int = 3000) -> ReplicaState:
    st = ReplicaState(cluster(1, max_batch=batch, kv=kv, max_batched_tokens=budget).replicas()[0])
    st.whole_seeded = whole
    return st


def test_seeded_means_a_seed_and_random_sampling():
    assert SamplingSpec(8, temperature=0.8, seed=1).seeded
    assert not SamplingSpec(8, temperature=0.8).seeded            # vLLM's shared generator: no rewind
    assert not SamplingSpec(8, temperature=0.0, seed=1).seeded    # greedy: no generator at all
    assert not Sequence(Request("c", 10, 4), 4).seeded            # token counts only


def test_engines_say_whether_they_split_a_seeded_prefill():
    class CPUvLLM:
        seeded_chunking = False

    st = _state(False)
    whole_seeded_prefill(CPUvLLM(), st)
    assert st.whole_seeded
    whole_seeded_prefill(object(), st)                  # no attribute: it can (emulated, transformers)
    assert not st.whole_seeded


def test_prefill_chunk_and_begin_keep_a_seeded_prefill_whole():
    st = _state(True)
    seeded, plain = Sequence(_req("s", 200, 4, seed=7), 4), Sequence(_req("p", 200, 4), 4)
    st.add([seeded, plain])
    assert st.prefill_chunk(plain, 64) == 64 and st.prefill_chunk(plain, 500) == 200
    assert st.prefill_chunk(seeded, 64) == 0 and st.prefill_chunk(seeded, 200) == 200
    with pytest.raises(SchedulingError, match="prefilled whole"):
        st.begin(Iteration(PREFILL, [(seeded, 64)]))
    st.whole_seeded = False
    assert st.prefill_chunk(seeded, 64) == 64
    assert st.begin(Iteration(PREFILL, [(seeded, 64)])) is not None     # a GPU generator rewinds


def _batch(rng: random.Random, n: int = 40) -> list[Request]:
    """Prompts 20..220 tokens (some above the 128-token budget), a third of them seeded."""
    return [_req(f"r{i}", rng.randint(20, 220), rng.randint(2, 30), seed=i if i % 3 == 0 else None)
            for i in range(n)]


def _drive(st: ReplicaState, policy, reqs: list[Request]) -> list[list[tuple[Sequence, int, int, int]]]:
    """The simulator's replica loop; every iteration's chunks as (sequence, start, tokens, whole prefill)."""
    st.add([Sequence(q, q.output_tokens) for q in reqs])
    t, seen = 0.0, []
    while st.has_work:
        d = start_iteration(st, policy)
        assert d is not None, "the replica stalled with work left"
        it = st.current
        seen.append([(s, s.prefilled - n, n, s.prefill_target) for s, n in it.prefill])
        st.complete(it, t, t + d)
        t += d
    assert len(st.finished) == len(reqs) and st.kv_used == 0
    return seen


POLICIES = {
    "lagrangian-chunked": lambda: LagrangianPolicy(1.0, True, 32, chunk_tokens=96, ramp="shortest"),
    "lagrangian-eager": lambda: LagrangianPolicy(1e6, True, 32, chunk_tokens=64, ramp="off"),
    "chunked": lambda: ChunkedPrefill(96),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_never_split_a_seeded_prefill(name):
    split = {}
    for whole in (False, True):
        seen = _drive(_state(whole), POLICIES[name](), _batch(random.Random(3)))
        partial = [s for chunks in seen for s, start, n, target in chunks if start or n != target]
        split[whole] = {s.seeded for s in partial}
        if whole:                    # every seeded (re)prefill ran in one piece, above the budget too
            assert not any(s.seeded for s in partial)
            big = [(s, n) for chunks in seen for s, _, n, _ in chunks if s.seeded and n > 128]
            assert big, "no seeded prompt above the token budget was exercised"
    assert split[False] == {True, False}      # without the constraint the policy splits seeded prompts too
    assert split[True] == {False}             # with it, only the others


def test_a_whole_prompt_above_every_budget_runs_alone_in_a_prefill_iteration():
    st = _state(True, budget=64)
    pol = ChunkedPrefill(64)
    st.add([Sequence(_req("small", 10, 20), 20)])
    assert start_iteration(st, pol) is not None
    st.complete(st.current, 0.0, 1.0)                            # "small" now decodes
    big = Sequence(_req("big", 150, 4, seed=1), 4)
    st.add([big])
    it = st.current if start_iteration(st, pol) is not None else None
    assert it.kind == PREFILL and [(s.id, n) for s, n in it.prefill] == [("big", 150)]
    st.complete(it, 1.0, 2.0)
    it = st.current if start_iteration(st, pol) is not None else None
    assert it.kind != MIXED or all(s.id != "big" for s, _ in it.prefill)
