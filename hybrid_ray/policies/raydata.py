"""A faithful model of `ray.data.llm`'s dispatch, as a baseline (`--policy raydata`).

Our reading of Ray's source (Ray 2.60: ``vLLMEngineProcessorConfig``, ``ActorPoolMapOperator``):

* the dataset's rows are cut into blocks of ``batch_size`` rows (default 32,
  ``ray/llm/_internal/batch/processor/base.py``) in input order;
* the LLM stage is an actor pool with one vLLM engine per replica (``concurrency`` = replicas).
  Each engine actor runs at most ``max_concurrent_batches`` blocks at once (default 8, its Ray
  ``max_concurrency``: ``OfflineProcessorConfig`` in ``ray/llm/_internal/batch/processor/base.py``,
  passed as ``max_concurrency`` in ``ray/llm/_internal/batch/processor/vllm_engine_proc.py``);
* Ray Data submits a block to the actor with the fewest tasks in flight, and only while that
  actor has fewer than ``max_tasks_in_flight_per_actor`` (``ActorPoolMapOperator``,
  ``ray/data/_internal/execution/operators/actor_pool_map_operator.py``: ``least_busy_rank >=
  max_tasks_in_flight_per_actor()`` holds the block back). Unset, as Ray Data LLM leaves it, that
  cap is ``max_concurrency x DEFAULT_ACTOR_MAX_TASKS_IN_FLIGHT_TO_MAX_CONCURRENCY_FACTOR`` = 8 x 2
  = 16 (``ray/data/context.py``: the factor is 2, env
  ``RAY_DATA_ACTOR_DEFAULT_MAX_TASKS_IN_FLIGHT_TO_MAX_CONCURRENCY_FACTOR``). So an actor holds up
  to 16 blocks: 8 running in its engine, the others queued in the actor (bound to it) in the
  order they were submitted, each starting when a running block completes (all its rows
  returned); the next block goes out when one of its blocks completes;
* inside the engine, the rows of its running blocks are scheduled by vLLM itself. The stage
  builds ``vllm.AsyncLLMEngine`` (``ray/llm/_internal/batch/stages/vllm_engine_stage.py``), a v1
  engine in current vLLM: chunked prefill at ``max_num_batched_tokens``, running requests first,
  then waiting ones FCFS (``build_raydata`` pairs this dispatcher with ``vllm_v1_engine``).

With requests arriving over time, a block is cut as soon as ``batch_size`` rows have arrived
(a batch job reads its input up front; the last, partial block goes when the input ends).
"""
from __future__ import annotations

from collections import deque

from ..replica import LoadReport, Sequence

# Ray Data's DEFAULT_ACTOR_MAX_TASKS_IN_FLIGHT_TO_MAX_CONCURRENCY_FACTOR (ray/data/context.py, Ray 2.60):
# unset, an actor pool's max_tasks_in_flight_per_actor is this x the actor's max_concurrency
RAY_DATA_IN_FLIGHT_FACTOR = 2


class RayDataDispatcher:
    def __init__(self, total: int, batch_size: int = 32, max_concurrent_batches: int = 8,
                 max_tasks_in_flight: int | None = None):
        """``max_tasks_in_flight``: blocks submitted to one actor at most (None: Ray Data's default,
        ``RAY_DATA_IN_FLIGHT_FACTOR`` x ``max_concurrent_batches``); ``max_concurrent_batches`` of
        them run in its engine, the rest wait in the actor."""
        if max_tasks_in_flight is None:
            max_tasks_in_flight = RAY_DATA_IN_FLIGHT_FACTOR * max_concurrent_batches
        if batch_size < 1 or max_concurrent_batches < 1 or max_tasks_in_flight < 1:
            raise ValueError("batch_size, max_concurrent_batches and max_tasks_in_flight must be >= 1")
        self.batch_size = batch_size
        self.max_concurrent = max_concurrent_batches
        self.max_in_flight = max_tasks_in_flight
        self.total = total                      # rows in the dataset: the last block may be partial
        self.seen = 0
        self.partial: list[Sequence] = []
        self.blocks: deque[list[Sequence]] = deque()
        self.in_flight: dict[int, int] = {}     # replica -> blocks submitted to its actor, not completed
        self.running: dict[int, int] = {}       # replica -> of those, blocks running in its engine
        self.held: dict[int, deque[tuple[int, list[Sequence]]]] = {}   # replica -> blocks queued in the actor
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
        out: list[tuple[Sequence, int]] = []
        for s in finished:
            b = self.block_of.pop(s.id)
            self.remaining[b] -= 1
            if self.remaining[b] == 0:
                del self.remaining[b]
                self.in_flight[replica] -= 1
                self.running[replica] -= 1
                self._start_held(replica, out)      # the actor's next queued block takes the slot
        return out + self._dispatch(loads)

    def _start_held(self, replica: int, out: list[tuple[Sequence, int]]) -> None:
        held = self.held.get(replica)
        while held and self.running.get(replica, 0) < self.max_concurrent:
            _, block = held.popleft()
            self.running[replica] = self.running.get(replica, 0) + 1
            out.extend((s, replica) for s in block)

    def _reclaim(self, loads: list[LoadReport]) -> None:
        """Blocks queued in an actor that is gone (a failed replica: the Ray runtime leaves it out of
        ``loads``) go back to the front of the line, as Ray Data resubmits a dead actor's tasks; the
        rows of its running blocks are the driver's to requeue."""
        live = {r.index for r in loads}
        for i in [i for i, h in self.held.items() if h and i not in live]:
            held = self.held.pop(i)
            self.in_flight[i] -= len(held)
            for b, block in reversed(held):
                del self.remaining[b]
                self.blocks.appendleft(block)

    def _dispatch(self, loads: list[LoadReport]) -> list[tuple[Sequence, int]]:
        out: list[tuple[Sequence, int]] = []
        if self.held:
            self._reclaim(loads)
        while self.blocks:
            free = [r.index for r in loads if self.in_flight.get(r.index, 0) < self.max_in_flight]
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
            self.held.setdefault(target, deque()).append((b, block))
            self._start_held(target, out)
        return out
