"""VLLMEngine: our policies do admission control over a vLLM ``LLMEngine``; vLLM runs the model.

Our replica policy decides *which* waiting requests start (the planner's order, the Lagrangian
prefill-or-decode rule, the controller's moves); vLLM's own scheduler and paged KV cache run
what has been admitted. Mapping, per iteration the replica's policy chose:

* a sequence whose first prefill chunk is in the iteration -> ``add_request(id, {"prompt_token_ids":
  ...}, SamplingParams(max_tokens=remaining, ignore_eos=True, temperature=0))``;
* a sequence our state preempted (recompute) -> ``abort_request([id])``; its next admission adds
  it again with prompt + the tokens vLLM had generated, so greedy decoding continues unchanged;
* then one ``step()``, timed (time_scale 1: modelled = measured seconds).

vLLM steps every admitted request each step, so its token counts can run ahead of our state's
(e.g. during an iteration our policy made prefill-only). When vLLM finishes a request our state
still counts as running, the engine reports it in ``finished_early`` and the replica frees its
slot; a request our state finished first is aborted in vLLM at the next iteration. Keep vLLM's
``max_num_seqs`` / ``max_num_batched_tokens`` at least the cluster's, so everything we admit
runs at once. Requires the [vllm] extra (CUDA); ``FakeLLMEngine``-style objects with the same
four methods are enough for the admission logic (tests/test_engine_vllm.py).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from ..replica import PREFILLING, RUNNING, WAITING, Iteration, ReplicaState
from .base import EngineResult
from .transformers import synthetic_tokens


def _vllm_params(max_tokens: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)


class VLLMEngine:
    """Engine protocol over a vLLM ``LLMEngine`` (``add_request`` / ``step`` / ``abort_request``)."""

    time_scale = 1.0
    behind_s = 0.0

    def __init__(self, llm: Any, vocab: int, params: Callable[[int], Any] = _vllm_params):
        self.llm = llm
        self.vocab = vocab
        self.params = params
        self.active: dict[str, int] = {}           # in vLLM now: request id -> tokens generated before this add
        self.generated: dict[str, list[int]] = {}  # tokens vLLM generated per request (across recomputes)
        self.added: list[str] = []                 # every add_request, in order (for tests and logs)
        self.aborted: list[str] = []

    @classmethod
    def from_model(cls, model: str, seed: int = 0, dtype: str | None = None, **engine_args: Any) -> "VLLMEngine":
        from vllm import EngineArgs, LLMEngine

        args = EngineArgs(model=model, seed=seed, dtype=dtype or "auto", enable_prefix_caching=False, **engine_args)
        llm = LLMEngine.from_engine_args(args)
        return cls(llm, llm.get_model_config().get_vocab_size())

    async def execute(self, it: Iteration, state: ReplicaState) -> EngineResult:
        self._abort_gone(state)
        for s, _ in it.prefill:
            if s.id not in self.active:
                done = self.generated.setdefault(s.id, [])
                prompt = synthetic_tokens(s.id, s.req.prompt_tokens, self.vocab) + done
                self.llm.add_request(s.id, {"prompt_token_ids": prompt}, self.params(s.req.output_tokens - len(done)))
                self.active[s.id] = len(done)
                self.added.append(s.id)
        t0 = time.perf_counter()
        outputs = await asyncio.to_thread(self.llm.step)
        seconds = time.perf_counter() - t0
        early: list[str] = []
        for out in outputs:
            rid = out.request_id
            base = self.active.get(rid)
            if base is None:
                continue                                 # aborted meanwhile
            self.generated[rid][base:] = list(out.outputs[0].token_ids)
            if out.finished:
                del self.active[rid]
                del self.generated[rid]
                s = state.running.get(rid)
                if s is not None and state.generated(s) + it.decode < s.req.output_tokens:
                    early.append(rid)                    # vLLM ran ahead of our count: free the slot now
        return EngineResult(seconds, early)

    def reset_pace(self) -> None:
        """Nothing to pace: vLLM's steps take the time they take."""

    def _abort_gone(self, state: ReplicaState) -> None:
        """Abort requests our state preempted (to recompute later) or already finished."""
        gone = []
        for rid in self.active:
            s = state.running.get(rid) or state.prefilling.get(rid)
            if s is None or s.status not in (RUNNING, PREFILLING):
                gone.append(rid)
        for rid in gone:
            del self.active[rid]
            if not any(s.id == rid and s.status == WAITING for s in state.waiting):
                self.generated.pop(rid, None)           # finished (or moved away): forget its tokens
        if gone:
            self.llm.abort_request(gone)
            self.aborted.extend(gone)
