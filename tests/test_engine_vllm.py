"""VLLMEngine: our policy decides which requests vLLM gets (add_request), preemption aborts, vLLM steps.

The admission logic runs everywhere against ``FakeLLMEngine``, which mimics the four methods of
vLLM's ``LLMEngine`` the adapter uses. The test against a real vLLM runs only where vLLM imports
(CUDA machines: ``pytest.importorskip("vllm")``).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from hybrid_ray.config import ClusterSpec, ReplicaGroupSpec
from hybrid_ray.engines.vllm import VLLMEngine
from hybrid_ray.profiling import run_replica
from hybrid_ray.workload import Request

from helpers import COST


class FakeLLMEngine:
    """vLLM's LLMEngine surface: every step runs each admitted request one token further."""

    def __init__(self):
        self.reqs: dict[str, dict] = {}
        self.log: list[tuple[str, str]] = []
        self.max_active = 0

    def add_request(self, request_id, prompt, params):
        assert request_id not in self.reqs
        self.reqs[request_id] = {"prompt": list(prompt["prompt_token_ids"]), "max": params.max_tokens, "out": []}
        self.log.append(("add", request_id))
        self.max_active = max(self.max_active, len(self.reqs))

    def abort_request(self, request_ids):
        for rid in request_ids:
            self.reqs.pop(rid, None)
            self.log.append(("abort", rid))

    def step(self):
        outs = []
        for rid, r in list(self.reqs.items()):
            r["out"].append((len(r["prompt"]) + len(r["out"])) % 97)
            done = len(r["out"]) >= r["max"]
            outs.append(SimpleNamespace(request_id=rid, finished=done,
                                        outputs=[SimpleNamespace(token_ids=list(r["out"]))]))
            if done:
                del self.reqs[rid]
        return outs


def _params(n: int):
    return SimpleNamespace(max_tokens=n, ignore_eos=True, temperature=0.0)


def _run(kv: int, requests: list[Request], policy: str = "baseline", max_batch: int = 3, llm=None,
         params=_params):
    """One replica's loop with the adapter over ``llm`` (a fake by default)."""
    cluster = ClusterSpec("t", (ReplicaGroupSpec("g", 1, max_batch, kv, COST),))
    fake = llm if llm is not None else FakeLLMEngine()
    eng = VLLMEngine(fake, vocab=100, params=params)
    return run_replica(eng, cluster, requests, policy), fake, eng


REQS = [Request(f"r{i}", 4 + i % 5, 3 + (7 * i) % 11) for i in range(9)]


def test_the_policy_admits_and_vllm_never_holds_more_than_the_batch():
    state, fake, eng = _run(10_000, REQS)
    assert len(state.finished) == len(REQS)
    adds = [rid for op, rid in fake.log if op == "add"]
    assert adds == [q.id for q in REQS]                      # FCFS: the policy's order, each once
    assert fake.max_active <= 3                              # only what the policy admitted
    assert not fake.reqs and not eng.active and not eng.generated


def test_sampling_params_ask_for_exact_greedy_lengths():
    seen = []
    _run(10_000, REQS, params=lambda n: seen.append(n) or _params(n))
    assert seen == [q.output_tokens for q in REQS]          # max_tokens = the request's output tokens


def test_preemption_aborts_and_readmits_with_the_generated_tokens():
    state, fake, eng = _run(40, REQS)                      # small KV: recompute preemptions
    assert state.preempted_total > 0
    aborted = [rid for op, rid in fake.log if op == "abort"]
    assert aborted
    assert len(state.finished) == len(REQS)
    assert sorted(s.id for s in state.finished) == sorted(q.id for q in REQS)
    assert not fake.reqs and not eng.active
    adds = [rid for op, rid in fake.log if op == "add"]
    assert set(aborted) <= {rid for rid in adds if adds.count(rid) > 1}   # re-added after the abort


def test_vllm_running_ahead_frees_the_slot():
    """Prefill-first iterations do not decode in our model, but vLLM steps everyone: it finishes first."""
    state, fake, eng = _run(10_000, REQS)
    assert len(state.finished) == len(REQS) and not fake.reqs
    assert any(s.generated < s.req.output_tokens for s in state.finished)   # reported in finished_early


def test_against_a_real_vllm_engine(tmp_path):
    """A tiny random LLaMA saved locally, served by vLLM under our admission control (GPU only)."""
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    from hybrid_ray.engines.transformers import load_model

    load_model("tiny").save_pretrained(tmp_path)
    eng = VLLMEngine.from_model(str(tmp_path), skip_tokenizer_init=True, gpu_memory_utilization=0.2,
                                max_model_len=512)
    state, llm, _ = _run(10_000, REQS, llm=eng.llm, params=VLLMEngine(None, 0).params)
    assert len(state.finished) == len(REQS)
