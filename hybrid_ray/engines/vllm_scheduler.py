"""PlannedScheduler: vLLM's v1 scheduler, made to execute exactly the iteration hybrid-ray chose.

vLLM (``vllm/v1/core/sched/scheduler.py``) decides every step which requests get how many tokens:
running ones first, then waiting ones FCFS, each up to what it still needs. hybrid-ray's replica
policy decides that instead (the Lagrangian prefill-or-decode rule, the planned order, chunk
sizes, preemptions), so this subclass, set as ``SchedulerConfig.scheduler_cls``, turns the
policy's iteration into vLLM's schedule while leaving all of vLLM's bookkeeping (KV blocks,
request states, ``SchedulerOutput`` construction, ``update_from_output``) to vLLM's own code:

* ``set_plan(tokens, preempt, starts)`` before ``LLMEngine.step()``: ``tokens`` maps vLLM request
  ids to the tokens each computes in this step (a prefill chunk, or 1 for a decoding sequence);
  ``preempt`` lists running requests to evict (recompute), as our ``ReplicaState`` did; ``starts``
  says where each prefill chunk starts (a waiting request's: after the prefix-cache hits our state
  counted, ``engines/vllm.py``'s ``VLLMPrefixProbe``).
* ``schedule()`` preempts those first, moves the planned waiting requests to the front of the
  waiting queue in plan order, and runs vLLM's ``schedule``. Its per-request cap hook
  (``_reserve_prefill_lookahead``, called on every candidate request just before its tokens are
  fixed) returns the planned count, 0 for requests not in the plan: vLLM skips those (running)
  or stops admitting (waiting, which holds no planned request behind an unplanned one).
* Prefix caching: when vLLM admits a waiting request it looks its prompt up in its cache
  (``_get_local_prefix_cache_hit``); a planned request's hit is cut at its planned start (vLLM may
  find more: blocks the state did not count, which it then computes again; never less, since the
  probe pinned the blocks it counted), so the prefill starts exactly where our state priced it.
* The result is checked: the ``num_scheduled_tokens`` vLLM built must equal the plan, every
  planned chunk must start at its planned token, and vLLM must not have preempted anything on its
  own; otherwise ``PlanMismatch`` (a bug or a vLLM capacity set below the cluster config's, never
  silently different iterations). The last step's ``num_scheduled_tokens`` and chunk starts stay in
  ``last_scheduled`` and ``last_starts`` (the per-step agreement test).

With no plan set, it is vLLM's scheduler unchanged (vLLM's own warm-up steps).
Requires vLLM's engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), synchronous
scheduling and no speculative decoding; ``engines/vllm.py`` builds the engine that way.
"""
from __future__ import annotations

import time

from vllm.v1.core.sched.scheduler import Scheduler


class PlanMismatch(RuntimeError):
    """vLLM scheduled something other than the planned iteration."""


class PlannedScheduler(Scheduler):
    """vLLM's scheduler with its choices replaced by a plan; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plan: dict[str, int] | None = None
        self._preempt: list[str] = []
        self._starts: dict[str, int] = {}
        self.last_scheduled: dict[str, int] = {}    # num_scheduled_tokens of the last planned step
        self.last_starts: dict[str, int] = {}       # where its planned prefill chunks started in vLLM

    def set_plan(self, tokens: dict[str, int], preempt: list[str] | tuple[str, ...] = (),
                 starts: dict[str, int] | None = None) -> None:
        self._plan = dict(tokens)
        self._preempt = list(preempt)
        self._starts = dict(starts or {})

    def clear_plan(self) -> None:
        """Drop a plan a failed step left behind (``VLLMEngine.reset``)."""
        self._plan, self._preempt, self._starts = None, [], {}

    # -- vLLM hooks -------------------------------------------------------------------------------
    def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        n = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        if self._plan is None:
            return n
        return min(n, self._plan.get(request.request_id, 0))

    def _get_local_prefix_cache_hit(self, request):
        blocks, hit, boundary, diverged = super()._get_local_prefix_cache_hit(request)
        want = self._starts.get(request.request_id) if self._plan is not None else None
        if want is None or hit <= want:
            return blocks, hit, boundary, diverged        # less than planned: the start check reports it
        if want == 0:
            return self.kv_cache_manager.empty_kv_cache_blocks, 0, 0, False
        return self.kv_cache_manager.truncate_computed_blocks(blocks, want), want, min(boundary, want), diverged

    def schedule(self, *args, **kwargs):
        plan = self._plan
        if plan is None:
            return super().schedule(*args, **kwargs)
        now = time.monotonic()
        for rid in self._preempt:
            req = self.requests.get(rid)
            if req is None or req not in self.running:
                raise PlanMismatch(f"cannot preempt {rid}: vLLM does not hold it as running")
            self.running.remove(req)
            self._preempt_request(req, now)
        planned = [req for req in self.waiting if req.request_id in plan]
        if planned:
            order = {rid: k for k, rid in enumerate(plan)}
            planned.sort(key=lambda r: order[r.request_id])
            self.waiting.remove_requests(planned)
            self.waiting.prepend_requests(reversed(planned))
        ours = set(self.reset_preempted_req_ids)       # ours, and any since the last step
        starts = self._starts
        try:
            out = super().schedule(*args, **kwargs)
        finally:
            self._plan, self._preempt, self._starts = None, [], {}
        got = out.num_scheduled_tokens
        if got != plan:
            diff = {rid: (plan.get(rid, 0), got.get(rid, 0)) for rid in set(plan) | set(got)
                    if plan.get(rid, 0) != got.get(rid, 0)}
            raise PlanMismatch(f"vLLM scheduled other tokens than planned (request: (planned, scheduled)): {diff}")
        # vLLM advanced num_computed_tokens by the scheduled tokens: a chunk started that much earlier
        began = {rid: self.requests[rid].num_computed_tokens - got[rid] for rid in starts if rid in self.requests}
        if began != starts:
            diff = {rid: (s, began.get(rid)) for rid, s in starts.items() if began.get(rid) != s}
            raise PlanMismatch(f"vLLM started prefill chunks elsewhere than planned (request: (planned, vLLM's "
                               f"start)): {diff}")
        self.last_starts = began
        extra = set(out.preempted_req_ids or ()) - ours
        if extra:
            raise PlanMismatch(f"vLLM preempted {sorted(extra)} on its own: its KV cache is smaller than the "
                               f"replica's kv_capacity_tokens")
        self.last_scheduled = got
        return out
