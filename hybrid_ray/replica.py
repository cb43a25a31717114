"""One model replica's scheduling state: waiting queue, running batch, KV cache, one iteration at a time.

Pure Python, no Ray, no clock: the simulator (virtual time) and ``ReplicaActor`` (real time) both
drive this same object. A policy chooses an :class:`Iteration`; the replica validates it against
the batch and KV limits (``begin``), an engine executes it, and ``complete`` applies its effect.

Semantics (vLLM-like):

* A prefill of a sequence's whole (remaining) prompt produces its first output token; a decode
  iteration advances *every* running sequence by one token. A chunked prefill may split a
  prompt over several iterations; the token comes with the last chunk.
* A running sequence holds ``prompt + generated`` tokens of KV. Before a decode step needs more
  KV than is free, the newest running sequence is preempted by *recompute* (vLLM's default):
  it returns to the front of the waiting queue keeping its generated tokens, and its next
  prefill recomputes ``prompt + generated`` tokens. Nothing is lost or finished twice.
* ``begin`` prices an iteration by its kind only after checking that the kind matches what it
  holds (decode: no chunks; prefill: no decode; mixed: both), so no schedule it accepts is
  priced below its contents; each record counts recompute tokens and the output tokens yielded.
* Decode progress is tracked lazily (a global step counter and a heap of finish steps), so a
  decode step costs O(finished * log B), not O(B): the simulator must run 100k requests fast.
  The running sequences' *predicted* finish steps are counted the same way (``finishing``), so
  the Lagrangian rule reads its per-step counts in O(horizon) before every iteration, not O(B).
* Prefix caching (vLLM v1's default; a group's ``prefix_caching``): a request with ``hash_ids``
  shares its prompt's full ``block_size`` blocks with the other prompts that agree up to them
  (``prefix_cache.py``). On admission its leading cached blocks are hits: its prefill starts after
  them, at most at the last full block before its last token (vLLM's ``get_computed_blocks``: the
  last token is always computed), and its chunks are priced as continuations of that prefix.
  Policies see the hits through ``prefill_rest`` / ``prefill_chunk``. A block is cached when a
  chunk that fills it is scheduled (vLLM caches a block as it allocates it), so a chunk later in
  the same iteration may hit it: ``begin`` then shortens that chunk. A cached block is referenced
  while its sequences hold it, and the KV it occupies counts once. When they leave (finish,
  preemption) it stays cached but *evictable*: ``kv_free`` counts it as free, as vLLM does, and
  the least recently freed are evicted when the KV needs the room (``_make_room``). A hit on an
  evictable block takes it back out of the free KV (``admit_kv``). Only prompt blocks are cached
  (vLLM also caches full output blocks, which only a recompute of the same sequence could hit).
  Without ``hash_ids`` nothing of this runs: every number is the same.
* On a real engine the engine's own cache is the truth (``prefix_probe``, set by
  ``engines.base.engine_prefix_caching``; the model above is then off): the probe says how many
  leading tokens of a waiting sequence the engine holds cached now (``PrefixProbe.hit``), which
  ``prefill_rest`` / ``admit_kv`` / ``_start`` read in place of the model's hits, and ``begin`` asks
  it once per iteration where each admitted sequence's prefill starts (``PrefixProbe.admit``:
  its hits then, the blocks that the iteration's chunks ahead of it fill included). The chunk keeps
  the end the policy chose (its first tokens become hits), the hit tokens count in the sequence's
  own KV (a shared block is counted by each holder: the engine, which holds it once, always has
  the room the state thinks it has), and the chunk is priced as a continuation of the hit.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .config import ReplicaSpec
from .costmodel import CostModel
from .payload import Completion
from .planner.estimate import sequence_work
from .prefix_cache import PrefixCache, block_keys
from .workload import Request

WAITING, PREFILLING, RUNNING, FINISHED = 0, 1, 2, 3
STATUS_NAMES = ("waiting", "prefilling", "running", "finished")

PREFILL, DECODE, MIXED = "prefill", "decode", "mixed"


class SchedulingError(RuntimeError):
    """A policy produced an iteration that violates the replica's limits (a bug, not user input)."""


class PrefixProbe(Protocol):
    """A real engine's prefix cache, as ``ReplicaState.prefix_probe`` asks it (``engines/vllm.py``)."""

    def hit(self, s: "Sequence") -> int:
        """Leading tokens of waiting ``s``'s next prefill (``prefill_target``) the engine holds cached
        now: a multiple of its block size, below ``prefill_target`` (the last token is computed)."""

    def admit(self, chunks: list[tuple["Sequence", int]]) -> list[int]:
        """``begin``: the iteration's prefill chunks as (sequence, the token its chunk ends at), in
        order. For each waiting one, where the engine's step will start its prefill: its hits when the
        step admits it, blocks that the chunks ahead of it fill included, below its chunk's end and
        at least ``hit``; -1 for the others. The engine keeps those blocks until that step."""


@dataclass(slots=True, eq=False)
class Sequence:
    """A request's life on a replica. Policies read ``predicted_output``, never ``req.output_tokens``."""

    req: Request
    predicted_output: int
    status: int = WAITING
    generated: int = 0          # tokens generated as of decode step ``synced_step``
    synced_step: int = 0
    prefilled: int = 0          # tokens of the current (re)prefill already computed
    first_token_s: float = -1.0
    finish_s: float = -1.0
    preemptions: int = 0
    epoch: int = 0              # bumped on preemption: invalidates stale finish-heap entries
    admit_order: int = 0        # when it last got a batch slot: the newest is preempted first
    work_s: float = 0.0         # predicted replica-seconds on its replica (planner.estimate)
    sort_key: float = 0.0       # queue order for sorting policies (set once; -inf once preempted)
    replica: str = ""
    completion: Completion | None = None   # a real engine's output, once finished
    predicted_first: int = -1   # the prediction when first scheduled (metrics: prediction error)
    predicted_end: int = 0      # while running: the decode step it is predicted to finish at
    # prefix caching (ReplicaState._keys): its cacheable prompt blocks' keys at its replica's block
    # size (``keys_bs``; None: nothing to share), how many leading ones it references while admitted,
    # the prompt tokens its first admission found cached, and a memo of its hits (``_hits``)
    keys: tuple[int, ...] | None = None
    keys_bs: int = 0
    held: int = 0
    cached_tokens: int = 0
    hit_memo: tuple = ()

    @property
    def id(self) -> str:
        return self.req.id

    @property
    def prefill_target(self) -> int:
        """Tokens the next prefill must compute: the prompt, plus generated tokens after a recompute."""
        return self.req.prompt_tokens + self.generated

    @property
    def started(self) -> bool:
        """Any work done on it (a take-back would waste that work)."""
        return self.generated > 0 or self.prefilled > 0 or self.status != WAITING

    @property
    def seeded(self) -> bool:
        """A real request sampled from its own seeded generator (``SamplingSpec.seeded``)."""
        p = self.req.payload
        return p is not None and p.sampling.seeded


def iteration_time(cost: CostModel, kind: str, tokens: int, attn_sq: int, batch: int, ctx_tokens: int) -> float:
    """Modelled seconds of one iteration of ``kind`` with these cost features."""
    if kind == DECODE:
        return cost.decode_time(batch, ctx_tokens)
    if kind == PREFILL:
        return cost.prefill_time(tokens, attn_sq)
    return cost.mixed_time(tokens, attn_sq, batch, ctx_tokens)


@dataclass(slots=True)
class Iteration:
    """What a policy asks a replica to run next.

    ``prefill`` lists (sequence, tokens) chunks; ``decode`` advances every running sequence by
    one token; ``preempt`` lists running sequences the policy evicts first (recompute later).
    The replica fills the cost features in ``begin``.
    """

    kind: str
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)
    decode: bool = False
    preempt: list[Sequence] = field(default_factory=list)
    # cost features, set by ReplicaState.begin()
    tokens: int = 0
    attn_sq: int = 0
    batch: int = 0
    ctx_tokens: int = 0
    resident: int = 0           # sequences holding a batch slot during the iteration
    recompute_tokens: int = 0   # prefill tokens recomputing a preempted sequence's prompt + output
    outputs: int = 0            # output tokens the iteration yields (decodes + completed prefills)

    def duration(self, cost: CostModel) -> float:
        return iteration_time(cost, self.kind, self.tokens, self.attn_sq, self.batch, self.ctx_tokens)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a replica tells the router and controller (and what a ReplicaActor streams).

    ``predicted_finish_s`` = now + predicted remaining work (queued + running), from the same
    per-request estimate the planner packs with.
    """

    index: int
    name: str
    now: float
    waiting: int
    running: int
    movable: int                 # waiting sequences never started (may be moved)
    queued_work_s: float
    running_work_s: float
    predicted_finish_s: float
    group: str = ""              # replicas of one group share a cost model: work moves 1:1 among them

    @property
    def outstanding(self) -> int:
        return self.waiting + self.running


@dataclass(slots=True)
class IterationRecord:
    start_s: float
    end_s: float
    kind: str
    batch: int          # decoding sequences
    prefills: int       # sequences prefilled (whole or chunk)
    tokens: int         # prefill tokens
    resident: int       # sequences holding a slot
    attn_sq: int = 0    # prefill attention work (the cost model's A)
    ctx_tokens: int = 0 # context of the decoding sequences (the cost model's C)
    recompute_tokens: int = 0   # of ``tokens``: recompute prefill of preempted sequences (in ``tokens`` too)
    outputs: int = 0    # output tokens yielded: one per decoding sequence + one per completed prefill

    def predicted_s(self, cost: CostModel) -> float:
        """What ``cost`` says this iteration takes (calibration compares it with the measured time)."""
        return iteration_time(cost, self.kind, self.tokens, self.attn_sq, self.batch, self.ctx_tokens)


class ReplicaState:
    """Waiting queue + running batch + KV of one replica. Deterministic, no I/O."""

    def __init__(self, spec: ReplicaSpec):
        g = spec.group
        self.spec = spec
        self.name = spec.name
        self.index = spec.index
        self.max_batch = g.max_batch_size
        self.kv_capacity = g.kv_capacity_tokens
        self.max_batched_tokens = g.max_batched_tokens
        self.cost = g.cost_model
        # the engine's prefix cache (None: off, in the group or on an engine without one:
        # engines.base.engine_prefix_caching); ``_shared``: tokens that several admitted sequences
        # hold in one cached block, counted once in kv_used (sum of their footprints - kv_used)
        self.block_size = g.block_size
        self.prefix: PrefixCache | None = PrefixCache(None, g.block_size) if g.prefix_caching else None
        self._shared = 0
        # a real engine's prefix cache, asked for its hits (PrefixProbe; None: none, or the model above)
        self.prefix_probe: PrefixProbe | None = None
        # the engine cannot split a seeded sequence's prefill (its sampling generator cannot rewind:
        # vLLM on CPU); set by whoever pairs this state with an engine (engines.whole_seeded_prefill)
        self.whole_seeded = False
        self.waiting: list[Sequence] = []          # next to serve at index 0
        self.prefilling: dict[str, Sequence] = {}  # chunked prefill in progress (holds a slot)
        self.running: dict[str, Sequence] = {}     # insertion order: newest last
        self.step = 0                              # decode steps executed
        self.kv_used = 0                           # tokens held by running + prefilling
        self.waiting_dirty = False                 # set when the queue changed (sorters re-sort)
        # set by a sorter that ordered only the queue's front (policies/sorting.py): orders the rest
        self.unsorted_tail: Callable[[ReplicaState], None] | None = None
        self.current: Iteration | None = None
        self.busy_s = 0.0
        self.records: list[IterationRecord] = []
        self.finished: list[Sequence] = []
        self.preempted_total = 0
        self._heap: list[tuple[int, int, int, Sequence]] = []   # (finish_step, tiebreak, epoch, seq)
        self._tiebreak = 0
        self._admitted = 0
        # the queue's load, kept as it changes so that report() need not walk the queue: the
        # never-started (movable) sequences' count and planned work, and the started ones
        self._fresh_n = 0
        self._fresh_work = 0.0
        self._fresh_tokens = 0                     # predicted output tokens of never-started sequences
        self._resumed: dict[int, Sequence] = {}   # id() -> waiting sequence that has started (preempted)
        # running sequences by predicted finish step, kept as they start and leave, so that the
        # Lagrangian rule's per-step counts cost O(horizon), not O(batch): those due at or before
        # the last swept step are only counted
        self._due: dict[int, int] = {}
        self._due_steps: list[int] = []
        self._overdue = 0
        self._swept = -1

    def __getstate__(self) -> dict:
        """Pickled (a replica actor hands its state back for the run's metrics) without the engine's
        cache probe, which holds the engine."""
        d = self.__dict__.copy()
        d["prefix_probe"] = None
        return d

    # -- views for policies -----------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.running) - len(self.prefilling)

    @property
    def kv_free(self) -> int:
        return self.kv_capacity - self.kv_used

    @property
    def idle(self) -> bool:
        return self.current is None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    @property
    def outstanding(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.prefilling)

    def generated(self, s: Sequence) -> int:
        """Tokens generated so far (running sequences advance lazily with ``step``)."""
        if s.status == RUNNING:
            return s.generated + self.step - s.synced_step
        return s.generated

    def prefill_whole(self, s: Sequence) -> bool:
        """``s``'s (re)prefill must be computed in one iteration: it is seeded and this replica's engine
        cannot split a seeded prefill (``whole_seeded``)."""
        return self.whole_seeded and s.seeded

    def prefill_rest(self, s: Sequence) -> int:
        """Tokens ``s``'s (re)prefill still has to compute: ``prefill_target - prefilled``, less the
        cache hits a waiting sequence would get if admitted now (``_hits``)."""
        rest = s.prefill_target - s.prefilled
        if s.keys is None or s.status != WAITING:
            if self.prefix_probe is not None and s.status == WAITING:
                return rest - self.prefix_probe.hit(s)
            return rest
        return rest - self._hits(s)[0] * self.block_size

    def admit_kv(self, s: Sequence) -> int:
        """KV tokens admitting waiting ``s`` takes beyond the tokens it computes: its hits on evictable
        cached blocks, which ``kv_free`` counts as free (0 when it is admitted, or hits nothing free).
        A policy that admits ``s`` with a chunk of ``n`` needs ``n + admit_kv(s)`` free (+ 1 if the
        chunk completes its prompt). With an engine's cache (``prefix_probe``): all its hits, which the
        state counts in the sequence's own KV."""
        if s.keys is None or s.status != WAITING:
            if self.prefix_probe is not None and s.status == WAITING:
                return self.prefix_probe.hit(s)
            return 0
        return self._hits(s)[1] * self.block_size

    def prefill_chunk(self, s: Sequence, limit: int) -> int:
        """Tokens of ``s``'s next prefill chunk under a cap of ``limit``: everything it has left if that
        fits, else ``limit``, or 0 when ``s`` must be prefilled whole (``prefill_whole``) and does not
        fit. Every policy chunks prompts through this, so no policy splits what the engine cannot.
        A whole prompt longer than any chunk goes first in a prefill-only iteration, which ``begin``
        lets exceed the token budget (``fcfs.admit_in_order``)."""
        rest = self.prefill_rest(s)
        if rest <= limit:
            return rest
        if limit <= 0 or self.prefill_whole(s):
            return 0
        return limit

    def remaining_predicted(self, s: Sequence) -> int:
        return max(s.predicted_output - self.generated(s), 1)

    def estimate(self, prompt: int, output: int) -> float:
        """Predicted replica-seconds of a request on this replica."""
        return sequence_work(self.cost, self.max_batch, self.kv_capacity, prompt, output)

    def report(self, now: float) -> LoadReport:
        """Snapshot of the load for routing and rebalancing: O(batch + started waiting), not O(queue)."""
        queued, movable = len(self.waiting), self._fresh_n
        q_work = self._fresh_work
        for s in self._resumed.values():
            q_work += self.estimate(s.prefill_target, max(s.predicted_output - s.generated, 1))
        d = self.cost.decode
        per_token = d.base_s / self.max_batch + d.per_seq_s
        r_tokens = longest = 0
        for s in self.running.values():
            rem = self.remaining_predicted(s)
            r_tokens += rem
            longest = rem if rem > longest else longest
        for s in self.prefilling.values():
            rem = self.remaining_predicted(s)
            r_tokens += rem
            longest = rem if rem > longest else longest
        r_work = r_tokens * per_token
        # work shares each decode step's base over a full batch; but the replica runs at least as
        # many steps as its longest sequence has left, full or not (planner/banded.py's estimate)
        idle = d.base_s * (longest - (r_tokens + self._fresh_tokens) / self.max_batch)
        finish = now + q_work + r_work + (idle if idle > 0.0 else 0.0)
        return LoadReport(self.index, self.name, now, queued, len(self.running) + len(self.prefilling), movable,
                          q_work, r_work, finish, self.spec.group.name)

    # -- queue changes (router, controller) ---------------------------------------------------
    def add(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            s.replica = self.name
            s.status = WAITING
            if s.req.hash_ids is not None:
                self._keys(s)
            s.work_s = self.estimate(s.req.prompt_tokens, s.predicted_output)
            self._queued(s)
        self.waiting.extend(seqs)
        self.waiting_dirty = True

    def take_back(self, count: int, newest_first: bool = True) -> list[Sequence]:
        """Remove up to ``count`` not-yet-started waiting sequences (for rebalancing)."""
        self._order_tail()
        out: list[Sequence] = []
        order = range(len(self.waiting) - 1, -1, -1) if newest_first else range(len(self.waiting))
        for i in order:
            if len(out) >= count:
                break
            if not self.waiting[i].started:
                out.append(self.waiting[i])
        if out:
            ids = {id(s) for s in out}
            self.waiting = [s for s in self.waiting if id(s) not in ids]
            for s in out:
                self._dequeued(s)
            self.waiting_dirty = True
        return out

    def drain_unfinished(self, started_only: bool = False) -> list[Sequence]:
        """Everything not finished, reset to be recomputed elsewhere (replica lost). A real request
        (with a payload) restarts from its prompt: its generated tokens stay in the lost engine.

        ``started_only``: what the engine held (running, prefilling, and waiting sequences that have
        started, e.g. preempted), after a failed engine step; those that never started stay queued."""
        self._order_tail()
        keep = [s for s in self.waiting if not s.started] if started_only else []
        queued = [s for s in self.waiting if s.started] if started_only else self.waiting
        out = list(self.running.values()) + list(self.prefilling.values()) + queued
        for s in out:
            s.generated = 0 if s.req.payload is not None else self.generated(s)
            s.status, s.prefilled, s.held = WAITING, 0, 0
            s.epoch += 1
            s.replica = ""                    # gone from here (a start-up program must not admit it)
        self.running.clear(), self.prefilling.clear(), self._heap.clear()
        self._due.clear(), self._due_steps.clear()
        self._overdue = 0
        self.waiting, self.kv_used, self.current = [], 0, None
        self._shared = 0
        if self.prefix is not None:
            self.prefix.clear()                   # the engine's cache went with it
        self._fresh_n, self._fresh_work, self._fresh_tokens = 0, 0.0, 0
        self._resumed.clear()
        if keep:
            self.waiting = keep
            self.recount_queue()
            self.waiting_dirty = True
        return out

    def repredict(self, predict: Callable[[Request], int], rekey: Callable[[Sequence], float] | None = None) -> int:
        """New predictions for the queued sequences that never started (their predicted work and, with
        ``rekey``, their sort key follow), after the length predictor learned from completions. The
        queue is marked dirty so sorting policies re-sort. Returns how many predictions changed."""
        self._order_tail()
        changed = 0
        delta = 0.0
        tokens = 0
        work: dict[tuple[int, int], float] = {}        # many requests share (prompt, prediction)
        for s in self.waiting:
            if s.generated or s.prefilled or s.status != WAITING:      # started (not s.started: hot loop)
                continue
            p = predict(s.req)
            if p != s.predicted_output:
                tokens += p - s.predicted_output
                s.predicted_output = p
                key = (s.req.prompt_tokens, p)
                w = work.get(key)
                if w is None:
                    w = work[key] = self.estimate(key[0], p)
                delta += w - s.work_s                  # never-started sequences count in _fresh_work
                s.work_s = w
                if rekey is not None and not s.preemptions:   # a preempted one stays in front (-inf)
                    s.sort_key = rekey(s)
                changed += 1
        if changed:
            self._fresh_work += delta
            self._fresh_tokens += tokens
            self.waiting_dirty = True
        return changed

    # -- one iteration ------------------------------------------------------------------------
    def begin(self, it: Iteration) -> Iteration | None:
        """Validate ``it`` against its kind and the limits, apply preemptions and admissions, set cost features.

        The cost model prices an iteration by its kind, so the kind must match the contents (else a
        prompt labelled as a decode step would be priced as one): a decode step has no prefill
        chunks and advances every running sequence by exactly one token; a prefill has chunks and no
        decode; a mixed one both. Each chunk belongs to one waiting or prefilling sequence of this
        replica, once. Returns None if KV-pressure preemption left nothing to run (the policy is
        asked again); the kind then follows what is left (a mixed step whose chunks were all
        preempted is a decode step, one whose running batch was is a prefill).
        """
        self._check_contents(it)
        for s in it.preempt:
            if s.status in (RUNNING, PREFILLING) and self._holder(s) is not s:
                raise SchedulingError(f"{self.name}: cannot preempt {s.id} ({STATUS_NAMES[s.status]} elsewhere)")
            self._preempt(s)
        start = self._start
        chunk_tokens = sum(n for _, n in it.prefill)
        completing = sum(1 for s, n in it.prefill if start(s) + n >= s.prefill_target)
        if it.decode:
            extra = self._admit_extra(it.prefill)
            while self.running and (self.kv_used + len(self.running) + chunk_tokens + completing + extra
                                    > self.kv_capacity):
                victim = self._newest_admitted()
                self._preempt(victim)
                if victim.status == WAITING and any(v is victim for v, _ in it.prefill):
                    it.prefill = [(v, n) for v, n in it.prefill if v is not victim]
                chunk_tokens = sum(n for _, n in it.prefill)
                completing = sum(1 for s, n in it.prefill if start(s) + n >= s.prefill_target)
                extra = self._admit_extra(it.prefill)
            if not self.running:
                it.decode = False
                it.kind = PREFILL
            elif not it.prefill:
                it.kind = DECODE              # its chunks' sequences were preempted: priced as what runs
        if not it.prefill and not it.decode:
            return None                       # preemption emptied it: the caller asks the policy again
        running_ctx = self.kv_used + self._shared - sum(s.prefilled for s in self.prefilling.values())
        tokens = attn = recompute = 0
        admitted: list[Sequence] = []
        budget = max(self.max_batched_tokens, it.prefill[0][1] if it.prefill else 0)
        # where each chunk starts as the policy saw it (a waiting sequence: after its cache hits); the
        # blocks that chunks ahead of it in this iteration compute are cached as they are scheduled
        # (vLLM caches a block when it allocates it), which can only add hits and shorten the chunk
        seen = [start(s) for s, _ in it.prefill] if self.prefix is not None and \
            any(s.keys is not None for s, _ in it.prefill) else None
        # an engine's cache: where its step will start each admitted prefill (the chunk's end stays)
        probed = None
        if self.prefix_probe is not None and any(s.status == WAITING for s, _ in it.prefill):
            seen = [start(s) for s, _ in it.prefill]
            probed = self.prefix_probe.admit([(s, b + n) for (s, n), b in zip(it.prefill, seen)])
        completing = 0
        for i, (s, n) in enumerate(it.prefill):
            base = s.prefilled if seen is None else seen[i]   # a continuation costs its prefix
            if s.status == WAITING:
                if s.replica != self.name:
                    raise SchedulingError(f"{self.name}: {s.id} waits on {s.replica or 'no replica'}, not here")
                admitted.append(s)
            elif s.status != PREFILLING or self.prefilling.get(s.id) is not s:
                raise SchedulingError(f"{self.name}: {s.id} is {STATUS_NAMES[s.status]}"
                                      f"{'' if s.status != PREFILLING else ' elsewhere'}, cannot prefill")
            if n <= 0 or base + n > s.prefill_target:
                raise SchedulingError(f"{self.name}: bad chunk {n} for {s.id} ({base}/{s.prefill_target})")
            if s.keys is not None:
                if s.status == WAITING:
                    hit = self._acquire(s)
                    if hit < base:                        # nothing is evicted before _make_room
                        raise SchedulingError(f"{self.name}: {s.id}'s cache hit shrank to {hit} < {base}")
                    base = hit
                    if base + n > s.prefill_target:
                        n = s.prefill_target - base       # hits on blocks cached by this iteration's chunks
                        it.prefill[i] = (s, n)
                self._register(s, base + n)
            elif probed is not None and s.status == WAITING:
                hit = probed[i]
                if not base <= hit < base + n:
                    raise SchedulingError(f"{self.name}: {s.id}'s cache hit moved from {base} to {hit} "
                                          f"(its chunk ends at {base + n})")
                n -= hit - base                           # hits on blocks this iteration's chunks fill
                it.prefill[i] = (s, n)
                base = self._acquire_probed(s, hit)
            if base + n >= s.prefill_target:
                completing += 1
            if base + n != s.prefill_target and self.prefill_whole(s):
                raise SchedulingError(f"{self.name}: chunk {n} of {s.id}'s {s.prefill_target - base}-token prefill: "
                                      f"a seeded sequence is prefilled whole on this engine (prefill_chunk)")
            attn += n * (2 * base + n)   # chunks telescope: sum = L^2 of the whole prompt
            tokens += n
            if s.generated:
                recompute += n                # prompt + generated again, after a preemption
        if admitted:
            self._remove_waiting(admitted)
            for s in admitted:
                s.status = PREFILLING
                self._admitted += 1
                s.admit_order = self._admitted
                self.prefilling[s.id] = s
        self.kv_used += tokens
        for s, n in it.prefill:
            s.prefilled += n
        if self.free_slots < 0:
            raise SchedulingError(f"{self.name}: batch {self.max_batch - self.free_slots} > {self.max_batch}")
        growth = len(self.running) if it.decode else 0
        if self.kv_used + growth + completing > self.kv_capacity:
            raise SchedulingError(f"{self.name}: KV {self.kv_used + growth + completing} > {self.kv_capacity}")
        if tokens + growth > budget and it.kind != DECODE:
            raise SchedulingError(f"{self.name}: {tokens + growth} tokens > budget {budget}")
        it.tokens, it.attn_sq, it.recompute_tokens = tokens, attn, recompute
        it.batch = len(self.running) if it.decode else 0
        it.ctx_tokens = running_ctx if it.decode else 0
        it.resident = len(self.running) + len(self.prefilling)
        it.outputs = it.batch + completing
        self.current = it
        if self.prefix is not None and self.prefix.free_blocks:
            self._make_room()
        return it

    def _check_contents(self, it: Iteration) -> None:
        """The iteration's kind matches what it holds; no sequence is chunked twice in it."""
        where = f"{self.name}: {it.kind} iteration"
        if it.kind == DECODE:
            if not it.decode:
                raise SchedulingError(f"{where} without decode=True")
            if it.prefill:
                raise SchedulingError(f"{where} holds a prefill chunk of {it.prefill[0][0].id} "
                                      f"({it.prefill[0][1]} tokens): label it {MIXED!r}")
        elif it.kind == PREFILL:
            if it.decode:
                raise SchedulingError(f"{where} with decode=True: label it {MIXED!r}")
            if not it.prefill:
                raise SchedulingError(f"{where} holds no prefill chunk")
        elif it.kind == MIXED:
            if not it.decode or not it.prefill:
                raise SchedulingError(f"{where} needs both prefill chunks and decode=True "
                                      f"(got {len(it.prefill)} chunks, decode={it.decode})")
        else:
            raise SchedulingError(f"{self.name}: unknown iteration kind {it.kind!r}")
        if it.kind == DECODE and not self.running and not it.preempt:
            raise SchedulingError(f"{where} with nothing running")
        if len(it.prefill) > 1:
            seen: set[int] = set()
            for s, _ in it.prefill:
                if id(s) in seen:
                    raise SchedulingError(f"{self.name}: {s.id} has two chunks in one iteration")
                seen.add(id(s))

    def _holder(self, s: Sequence) -> Sequence | None:
        """This replica's running or prefilling sequence with ``s``'s id (None: not held here)."""
        return self.running.get(s.id) or self.prefilling.get(s.id)

    def complete(self, it: Iteration, start_s: float, end_s: float) -> list[Sequence]:
        """Apply the finished iteration at ``end_s``; return the sequences that finished."""
        done: list[Sequence] = []
        if it.decode:
            self.step += 1
            self.kv_used += len(self.running)
            heap = self._heap
            while heap and heap[0][0] <= self.step:
                _, _, epoch, s = heapq.heappop(heap)
                if s.epoch == epoch and s.status == RUNNING:
                    self._unrun(s)
                    s.generated = s.req.output_tokens
                    self._finish(s, end_s)
                    done.append(s)
        for s, _ in it.prefill:
            if s.prefilled < s.prefill_target:
                continue                      # more chunks to come
            del self.prefilling[s.id]
            s.generated += 1                  # the prefill yields the next token
            s.prefilled = 0
            if s.first_token_s < 0:
                s.first_token_s = end_s
            self.kv_used += 1
            if s.generated >= s.req.output_tokens:
                self._finish(s, end_s)
                done.append(s)
                continue
            s.status, s.synced_step = RUNNING, self.step
            self.running[s.id] = s
            self._run(s)
            self._tiebreak += 1
            heapq.heappush(self._heap, (self.step + s.req.output_tokens - s.generated, self._tiebreak, s.epoch, s))
        self.busy_s += end_s - start_s
        self.records.append(IterationRecord(start_s, end_s, it.kind, it.batch, len(it.prefill), it.tokens,
                                            it.resident, it.attn_sq, it.ctx_tokens, it.recompute_tokens,
                                            it.outputs))
        self.current = None
        if self.prefix is not None and self.prefix.free_blocks:
            self._make_room()
        return done

    def settle(self, completions: dict[str, Completion], done: list[Sequence], now: float) -> list[Sequence]:
        """Attach a real engine's completions to the sequences it finished (``done``: those ``complete``
        just finished); one our state still counts as running stopped early (EOS, a stop string) and is
        freed now, which is when the state learns its true length. Returns ``done`` plus those."""
        if not completions:
            return done
        for s in done:
            c = completions.get(s.id)
            if c is not None:
                s.completion = c
        for sid, c in completions.items():
            s = self.running.get(sid)
            if s is not None:
                s.completion = c
                self.finish_early(s, now)
                done.append(s)
        return done

    def finish_early(self, s: Sequence, now: float) -> None:
        """An engine stopped a sequence before its max tokens (EOS); frees its slot and KV."""
        if s.status != RUNNING:
            return
        s.generated = self.generated(s)
        self._unrun(s)
        s.epoch += 1
        self._finish(s, now)

    def finishing(self, horizon: int) -> list[int]:
        """``out[i]``: running sequences predicted to finish after ``i + 1`` decode steps (``i <
        horizon``; ``out[0]`` also counts those predicted to have finished already); ``out[horizon]``
        is 0. What the Lagrangian rule reads before every decision: O(horizon)."""
        step = self.step
        due, steps = self._due, self._due_steps
        while steps and steps[0] <= step:          # now due: only counted from here on
            self._overdue += due.pop(heapq.heappop(steps), 0)
        self._swept = step
        get = due.get
        out = [get(step + 1 + i, 0) for i in range(horizon)]
        out.append(0)
        out[0] += self._overdue
        return out

    # -- internals ----------------------------------------------------------------------------
    def _run(self, s: Sequence) -> None:
        """``s`` started running: count it at its predicted finish step."""
        end = s.predicted_end = self.step + s.predicted_output - s.generated
        if end <= self._swept:
            self._overdue += 1
            return
        n = self._due.get(end, 0)
        if not n:
            heapq.heappush(self._due_steps, end)
        self._due[end] = n + 1

    def _unrun(self, s: Sequence) -> None:
        """``s`` stops running (finished, stopped early, preempted): out of the batch and its count,
        in one place, so that no way out of the batch can leave the counts stale."""
        del self.running[s.id]
        end = s.predicted_end
        if end <= self._swept:
            self._overdue -= 1
            return
        n = self._due[end] - 1
        if n:
            self._due[end] = n
        else:
            del self._due[end]                  # its heap entry goes when swept (popped with 0)

    def _order_tail(self) -> None:
        """Before reading the queue past its front: finish a sorter's partial sort, as if it had
        sorted it all."""
        if self.unsorted_tail is not None:
            self.unsorted_tail(self)

    def _queued(self, s: Sequence) -> None:
        """``s`` joined the queue: count it in the queue's load."""
        if s.started:
            self._resumed[id(s)] = s
        else:
            self._fresh_n += 1
            self._fresh_work += s.work_s
            self._fresh_tokens += s.predicted_output

    def _dequeued(self, s: Sequence) -> None:
        """``s`` left the queue (admitted, or taken back): before its status changes."""
        if self._resumed.pop(id(s), None) is None:
            self._fresh_n -= 1
            self._fresh_work -= s.work_s
            self._fresh_tokens -= s.predicted_output
            if not self._fresh_n:
                self._fresh_work = 0.0            # no drift once the queue empties

    def recount_queue(self) -> None:
        """Recompute the queue's load from scratch (after changing queued sequences' ``work_s``)."""
        self._order_tail()
        self._fresh_n, self._fresh_work, self._fresh_tokens = 0, 0.0, 0
        self._resumed.clear()
        for s in self.waiting:
            self._queued(s)

    def _remove_waiting(self, admitted: list[Sequence]) -> None:
        """Take admitted sequences off the queue. Policies admit from the front, so usually the
        admitted are a prefix of it, cut in one step; otherwise the queue is filtered once (and
        every admitted sequence must have been in it)."""
        w = self.waiting
        k = 0
        ids = {id(s) for s in admitted}
        while k < len(w) and id(w[k]) in ids:
            k += 1
        if k == len(admitted):
            del w[:k]
        else:
            rest = [s for s in w if id(s) not in ids]
            if len(rest) != len(w) - len(admitted):
                queued = {id(s) for s in w}
                lost = next(s for s in admitted if id(s) not in queued)
                raise SchedulingError(f"{self.name}: {lost.id} is not in this replica's waiting queue")
            self.waiting = rest
        for s in admitted:
            self._dequeued(s)

    def _newest_admitted(self) -> Sequence:
        newest = self.running[next(reversed(self.running))]
        for s in self.prefilling.values():
            if s.admit_order > newest.admit_order:
                newest = s
        return newest

    def _finish(self, s: Sequence, now: float) -> None:
        self._free_kv(s, s.req.prompt_tokens + s.generated)
        s.status, s.finish_s = FINISHED, now
        self.finished.append(s)

    def _preempt(self, s: Sequence) -> None:
        """Recompute preemption: free the KV, keep generated tokens, requeue at the front."""
        if s.status == RUNNING:
            s.generated = self.generated(s)
            self._unrun(s)
            self._free_kv(s, s.req.prompt_tokens + s.generated)
        elif s.status == PREFILLING:
            del self.prefilling[s.id]
            self._free_kv(s, s.prefilled)
        else:
            raise SchedulingError(f"{self.name}: cannot preempt {s.id} ({STATUS_NAMES[s.status]})")
        s.status, s.prefilled = WAITING, 0
        s.epoch += 1
        s.preemptions += 1
        s.sort_key = -math.inf                # stays in front of a sorted queue
        self.preempted_total += 1
        self._queued(s)
        self.waiting.insert(0, s)
        self.waiting_dirty = True

    # -- prefix cache -------------------------------------------------------------------------
    def _keys(self, s: Sequence) -> None:
        """Cut ``s``'s cache keys at this replica's block size (once per block size: a moved sequence
        keeps them); none where this replica caches nothing."""
        bs = self.block_size if self.prefix is not None else 0
        if s.keys_bs != bs:
            s.keys = (block_keys(s.req.hash_ids, s.req.prompt_tokens, bs) or None) if bs else None
            s.keys_bs = bs
        s.hit_memo = ()

    def _hits(self, s: Sequence) -> tuple[int, int]:
        """(leading blocks of ``s`` cached now, how many of those are free), at most the full blocks
        before its last token: vLLM computes that token (and so its whole block) even on a full hit.
        Memoized until the cache changes: policies ask before every iteration."""
        pc = self.prefix
        if pc is None:
            return 0, 0
        limit = (s.prefill_target - 1) // self.block_size
        m = s.hit_memo
        if m and m[0] == pc.version and m[1] == limit:
            return m[2], m[3]
        h = pc.match(s.keys, limit)
        f = pc.free_hits(s.keys, h) if h else 0
        s.hit_memo = (pc.version, limit, h, f)
        return h, f

    def _start(self, s: Sequence) -> int:
        """Tokens of ``s``'s prefill computed before its next chunk (a waiting one: its cache hits)."""
        if s.keys is None or s.status != WAITING:
            if self.prefix_probe is not None and s.status == WAITING:
                return self.prefix_probe.hit(s)
            return s.prefilled
        return self._hits(s)[0] * self.block_size

    def _admit_extra(self, prefill: list[tuple[Sequence, int]]) -> int:
        """KV the iteration's admissions take out of the evictable cache: their distinct free hits."""
        pc = self.prefix
        if pc is None or not pc.free_blocks:
            if self.prefix_probe is not None:
                return sum(self.prefix_probe.hit(s) for s, _ in prefill if s.status == WAITING)
            return 0
        seen: set[int] = set()
        for s, _ in prefill:
            if s.keys is not None and s.status == WAITING:
                h, f = self._hits(s)
                if f:
                    seen.update(k for k in s.keys[:h] if not pc.refcount(k))
        return len(seen) * self.block_size

    def _acquire(self, s: Sequence) -> int:
        """Admit waiting ``s`` after its cached blocks now: it references them, its prefill starts after
        them, and those that were free count in kv_used again; returns where its prefill starts. Its
        first admission records the hit (vLLM's ``num_cached_tokens``)."""
        bs = self.block_size
        h = self._hits(s)[0]
        if not s.admit_order:
            s.cached_tokens = h * bs
        if h:
            was_free = self.prefix.acquire(s.keys, h)
            s.held = h
            s.prefilled = h * bs
            self.kv_used += was_free * bs
            self._shared += (h - was_free) * bs
        return h * bs

    def _acquire_probed(self, s: Sequence, hit: int) -> int:
        """Admit waiting ``s`` after the ``hit`` tokens the engine's cache holds (``prefix_probe``): its
        prefill starts there and they count in its own KV; its first admission records the hit."""
        if not s.admit_order:
            s.cached_tokens = hit
        s.prefilled = hit
        self.kv_used += hit
        return hit

    def _register(self, s: Sequence, upto: int) -> None:
        """Cache ``s``'s full prompt blocks up to token ``upto`` (its chunk's end), in order, until one is
        cached already (a copy computed alongside stays private, as a duplicate block does in vLLM).
        At scheduling, as vLLM does: a chunk later in the same iteration may hit them."""
        n = min(upto // self.block_size, len(s.keys))
        if n > s.held:
            s.held += self.prefix.insert_run(s.keys, s.held, n)

    def _free_kv(self, s: Sequence, footprint: int) -> None:
        """``s`` (holding ``footprint`` tokens) leaves: its own tokens are freed, its cached blocks
        released (those nobody else holds become evictable)."""
        h = s.held
        if not h:
            self.kv_used -= footprint
            return
        s.held = 0
        freed = self.prefix.release(s.keys, h)
        bs = self.block_size
        self.kv_used -= footprint - (h - freed) * bs
        self._shared -= (h - freed) * bs

    def _make_room(self) -> None:
        """Keep the KV in use plus the evictable cached blocks within capacity: evict the least
        recently freed blocks (vLLM takes a block's memory back only when it needs it)."""
        pc = self.prefix
        over = self.kv_used + pc.free_blocks * self.block_size - self.kv_capacity
        if over > 0:
            pc.evict(-(-over // self.block_size))
