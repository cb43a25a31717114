"""Sarathi-style chunked prefill: every iteration decodes all running sequences and fills the
rest of a fixed token budget with prompt chunks (in-progress prompts first, then new ones FCFS).

Decodes never stall for a whole prompt, which bounds inter-token latency; the price is that
long prompts take several iterations. This is vLLM v1's default scheduler shape. Chunks are cut
by ``ReplicaState.prefill_chunk``: a prompt that must be prefilled whole (a seeded one on an
engine that cannot split it) waits, FCFS, until it fits the budget left; when it fits no
iteration's budget it runs alone at the head of a prefill-only iteration. A new prompt's cached
prefix is skipped (``ReplicaState.prefill_rest``) and its evictable blocks count as KV it takes
(``admit_kv``), as in vLLM's scheduler.
"""
from __future__ import annotations

from ..replica import DECODE, MIXED, PREFILL, Iteration, ReplicaState, Sequence


class ChunkedPrefill:
    name = "chunked"

    def __init__(self, token_budget: int = 512):
        if token_budget < 1:
            raise ValueError("token_budget must be >= 1")
        self.token_budget = token_budget

    def schedule(self, r: ReplicaState) -> Iteration | None:
        limit = min(self.token_budget, r.max_batched_tokens)
        budget = limit - len(r.running)
        kv_free = r.kv_free - len(r.running)
        chunks: list[tuple[Sequence, int]] = []
        for s in r.prefilling.values():
            if budget <= 0:
                break
            n = r.prefill_chunk(s, budget)
            if n <= 0 or n + 1 > kv_free:
                break
            chunks.append((s, n))
            budget -= n
            kv_free -= n + 1
        slots = r.free_slots
        for s in r.waiting:
            if budget <= 0 or slots <= 0:
                break
            n = r.prefill_chunk(s, budget)
            extra = r.admit_kv(s)
            if n <= 0:
                rest = r.prefill_rest(s)
                if not chunks and rest > limit - len(r.running) and rest + 1 + extra <= kv_free:
                    return Iteration(PREFILL, [(s, rest)], decode=False)   # whole: fits no budget
                break
            if n + 1 + extra > kv_free:
                break
            chunks.append((s, n))
            budget -= n
            kv_free -= n + 1 + extra
            slots -= 1
        if not chunks and not r.running and r.waiting and kv_free > 1:
            s = r.waiting[0]   # budget smaller than the batch: still make progress
            extra = r.admit_kv(s)
            n = r.prefill_chunk(s, min(limit, kv_free - 1 - extra))
            if n <= 0 and r.prefill_rest(s) + 1 + extra <= kv_free:
                n = r.prefill_rest(s)          # whole (prefill_chunk): alone, above the budget
            if n > 0:
                chunks.append((s, n))
        if r.running:
            return Iteration(MIXED if chunks else DECODE, chunks, decode=True)
        if chunks:
            return Iteration(PREFILL, chunks, decode=False)
        return None
