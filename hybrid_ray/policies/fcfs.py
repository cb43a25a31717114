"""FCFS continuous batching with prefill-first (vLLM v0 without chunked prefill).

Every iteration: if requests wait and a batch slot and KV are free, run a prefill of as many
waiting requests as fit, in queue order, stopping at the first that does not fit (FCFS: no
overtaking); the running batch stalls meanwhile. Otherwise decode every running sequence.
"""
from __future__ import annotations

from ..replica import DECODE, PREFILL, Iteration, ReplicaState, Sequence


def admit_in_order(r: ReplicaState, queue: list[Sequence], limit: int | None = None) -> list[tuple[Sequence, int]]:
    """Whole-prompt prefills from the front of ``queue`` while slots, KV and token budget allow.

    KV keeps one token per running sequence free for the next decode step. The first request is
    admitted even above the token budget (vLLM's budget is at least the model length). A prompt's
    cached prefix is neither computed nor budgeted; its evictable blocks count as KV it takes
    (``ReplicaState.prefill_rest``, ``admit_kv``).
    """
    slots = r.free_slots if limit is None else min(r.free_slots, limit)
    kv_free = r.kv_free - len(r.running)
    budget = r.max_batched_tokens
    out: list[tuple[Sequence, int]] = []
    tokens = 0
    for s in queue:
        if len(out) >= slots:
            break
        n = r.prefill_rest(s)
        need = n + 1 + r.admit_kv(s)
        if need > kv_free or (out and tokens + n > budget):
            break
        out.append((s, n))
        tokens += n
        kv_free -= need
    return out


class FCFSPrefillFirst:
    """The paper's baseline inside a replica and vLLM v0's default behaviour."""

    name = "fcfs"

    def schedule(self, r: ReplicaState) -> Iteration | None:
        if r.waiting and r.free_slots > 0:
            batch = admit_in_order(r, r.waiting)
            if batch:
                return Iteration(PREFILL, batch, decode=False)
        if r.running:
            return Iteration(DECODE, decode=True)
        return None
