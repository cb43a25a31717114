"""A faithful model of `ray.data.llm`'s dispatch, as a baseline (`--policy raydata`).

Our reading of Ray's docs and source (vLLMEngineProcessorConfig, ActorPoolMapOperator):

* the dataset's rows are cut into blocks of ``batch_size`` rows (default 32) in input order;
* the LLM stage is an actor pool with one vLLM engine per replica (``concurrency`` = replicas);
  a block is submitted to the least-busy actor that has fewer than ``max_concurrent_batches``
  (default 8) blocks in flight, and the next block goes out when one of its blocks completes
  (all its rows returned);
* inside the engine, the rows of its in-flight blocks are scheduled by vLLM itself. The stage
  builds ``vllm.AsyncLLMEngine`` (``ray/llm/_internal/batch/stages/vllm_engine_stage.py``), a v1
  engine in current vLLM: chunked prefill at ``max_num_batched_tokens``, running requests first,
  then waiting ones FCFS (``build_raydata`` pairs this dispatcher with ``vllm_v1_engine``).

With requests arriving over time, a block is cut as soon as ``batch_size`` rows have arrived
(a batch job reads its input up front; the last, partial block goes when the input ends).
"""
from __future__ import annotations

from collections import deque

from ..replica import LoadReport, Sequence


class RayDataDispatcher:
    def __init__(self, total: int, batch_size: int = 32, max_concurrent_batches: int = 8):
        if batch_size < 1 or max_concurrent_batches < 1:
            raise ValueError("batch_size and max_concurrent_batches must be >= 1")
        self.batch_size = batch_size
        self.max_concurrent = max_concurrent_batches
        self.total = total                      # rows in the dataset: the last block may be partial
        self.seen = 0
        self.partial: list[Sequence] = []
        self.blocks: deque[list[Sequence]] = deque()
        self.in_flight: dict[int, int] = {}     # replica -> blocks in flight
        self.block_of: dict[str, int] = {}      # request id -> block number
        self.remaining: dict[int, int] = {}     # block number -> rows not finished
        self.next_block = 0

    def admit(self, seqs: list[Sequence], loads: list[LoadReport]) -> list[tuple[Sequence, int]]:
        for s in seqs:
            self.partial.append(s)
            self.seen += 1
            if len(self.partial) == self.batch_size or self.seen == self.total:
                self.blocks.append(self.partial)
                self.partial = []
        return self._dispatch(loads)

    def on_finished(self, replica: int, finished: list[Sequence], loads: list[LoadReport]
                    ) -> list[tuple[Sequence, int]]:
        for s in finished:
            b = self.block_of.pop(s.id)
            self.remaining[b] -= 1
            if self.remaining[b] == 0:
                del self.remaining[b]
                self.in_flight[replica] -= 1
        return self._dispatch(loads)

    def _dispatch(self, loads: list[LoadReport]) -> list[tuple[Sequence, int]]:
        out: list[tuple[Sequence, int]] = []
        while self.blocks:
            free = [r.index for r in loads if self.in_flight.get(r.index, 0) < self.max_concurrent]
            if not free:
                break
            target = min(free, key=lambda i: (self.in_flight.get(i, 0), i))   # least busy actor
            block = self.blocks.popleft()
            b = self.next_block
            self.next_block += 1
            self.remaining[b] = len(block)
            self.in_flight[target] = self.in_flight.get(target, 0) + 1
            for s in block:
                self.block_of[s.id] = b
                out.append((s, target))
        return out
