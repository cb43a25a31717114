"""TransformersEngine: greedy outputs, exact token counts, and recompute preemption on a tiny random LLaMA.

Needs the [engine] extra (torch, transformers); CI installs it. Models are built from a config
with a fixed seed (nothing is downloaded). Output comparisons use float64 so that batching,
padding and chunking cannot flip a greedy argmax by rounding.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hybrid_ray.config import ClusterSpec, ReplicaGroupSpec          # noqa: E402
from hybrid_ray.engines.factory import engine_spec, make_engine             # noqa: E402
from hybrid_ray.engines.transformers import (EngineSetupError, TransformersEngine, parse_model,  # noqa: E402
                                             synthetic_tokens)
from hybrid_ray.inputs import load_inputs                           # noqa: E402
from hybrid_ray.profiling import run_replica                        # noqa: E402
from hybrid_ray.workload import Request                             # noqa: E402

from helpers import COST                                            # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return TransformersEngine("tiny", dtype="float64", keep_outputs=True)


def _alone(e: TransformersEngine, key: str, prompt: int, limit: int) -> list[int]:
    """Reference: one sequence, a whole-prompt prefill, then one decode step at a time."""
    e.add_sequence(key, prompt, limit)
    e.step([(key, 0, prompt)], [])
    while key in e._seqs:
        e.step([], [key])
    return e.outputs.pop(key)


def test_greedy_output_matches_transformers_generate(engine):
    out = _alone(engine, "g1", 10, 20)
    ids = torch.tensor([synthetic_tokens("g1", 10, engine.vocab)])
    with torch.inference_mode():
        ref = engine.model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out == ref[0, 10:].tolist()


def test_batched_chunked_and_mixed_iterations_give_the_same_tokens(engine):
    ref = {k: _alone(engine, k, p, n) for k, p, n in [("a", 10, 20), ("b", 25, 15), ("c", 7, 12)]}
    for k, p, n in [("a", 10, 20), ("b", 25, 15), ("c", 7, 12)]:
        engine.add_sequence(k, p, n)
    engine.step([("b", 0, 25), ("a", 0, 4)], [])           # a whole prompt + a first chunk (padded batch)
    engine.step([("a", 4, 6), ("c", 0, 3)], ["b"])         # mixed: a chunk with a past, and a decode
    engine.step([("c", 3, 4)], ["a", "b"])
    while engine._seqs:
        engine.step([], list(engine._seqs))                # packed decode of unequal contexts
    assert {k: engine.outputs.pop(k) for k in ref} == ref


def _cluster(kv: int, max_batch: int = 4, chunk: int = 8192) -> ClusterSpec:
    return ClusterSpec("t", (ReplicaGroupSpec("g", 1, max_batch, kv, COST, chunk),))


def _requests(n: int) -> list[Request]:
    return [Request(f"r{i}", 5 + 7 * i % 23, 6 + 5 * i % 17) for i in range(n)]


def test_every_request_generates_exactly_its_output_tokens(engine):
    reqs = _requests(10)
    state = run_replica(engine, _cluster(10_000), reqs, "chunked")
    assert len(state.finished) == len(reqs) and any(r.kind == "mixed" for r in state.records)
    for q in reqs:
        assert len(engine.outputs.pop(q.id)) == q.output_tokens
    assert not engine._seqs                                # finished sequences free their cache


def test_preempted_requests_recompute_to_identical_outputs(engine):
    reqs = _requests(10)
    run_replica(engine, _cluster(10_000), reqs)
    free = {q.id: engine.outputs.pop(q.id) for q in reqs}
    state = run_replica(engine, _cluster(60), reqs)             # tiny KV: running sequences get preempted
    assert state.preempted_total > 0
    assert {q.id: engine.outputs.pop(q.id) for q in reqs} == free


def test_gsm8k_requests_on_the_float32_engine():
    cluster, reqs = load_inputs("cpu_tiny", "gsm8k", 12)
    e = TransformersEngine("tiny", threads=1, keep_outputs=True)
    state = run_replica(e, cluster, reqs)
    assert sorted(len(v) for v in e.outputs.values()) == sorted(q.output_tokens for q in reqs)
    assert 0 < state.busy_s < 5


def test_presets_overrides_and_errors(tmp_path):
    assert parse_model("llama-7b:layers=2,vocab=512")["layers"] == 2
    assert parse_model(str(tmp_path)) is None
    for bad in ("tiny:layers=x", "tiny:depth=2", "tiny:heads=3"):
        with pytest.raises(EngineSetupError):
            parse_model(bad)
    with pytest.raises(EngineSetupError, match="not a preset"):
        engine_spec("transformers", "no/such/model")
    assert engine_spec("emulated") is None
    spec = engine_spec("transformers", "tiny", cpus=1.0)
    assert spec["threads"] == 1 and make_engine(**spec).time_scale == 1.0
