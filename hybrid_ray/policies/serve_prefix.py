"""A faithful model of Ray Serve LLM's prefix-aware router, as a baseline (`--policy serve-prefix`).

Ray Serve LLM (``ray/llm/_internal/serve/routing_policies/prefix_aware/prefix_aware_router.py``,
``PrefixCacheAffinityRouter``, Ray 2.60; opted into with ``request_router_config`` on a Serve LLM
deployment) extends the power-of-two-choices router:

* it keeps a prefix tree of the prompt text routed to each replica (its "tenants",
  ``prefix_tree.py``), inserting each request's text under the replica it went to;
* when the load is balanced (the candidates' longest and shortest queues differ by at most
  ``imbalanced_threshold``, default ``inf``: always), it matches the request's text against the tree:
  with a match rate (matched characters over the text's) of at least ``match_rate_threshold``
  (default 0.1) the candidates are the tenants holding the longest match; below it, the "smallest
  tenants" (those with the fewest characters in the tree);
* when the load is imbalanced, or nothing was chosen, it falls back to the two random replicas;
* among the candidates, the replica with the shortest queue that accepts (fewer than
  ``max_ongoing_requests`` ongoing; Serve LLM's default 1e9) takes the request.

Here the text is the request's ``hash_ids`` chain (one id per 512-token block, the public trace
convention), so a match is counted in whole blocks and a rate in tokens; a request without
``hash_ids`` shares nothing (its text is its own), which sends it to the smallest tenant.
Deployed Serve LLM engines run vLLM v1 with prefix caching on.
"""
from __future__ import annotations

import math

from ..prefix_cache import HASH_BLOCK_TOKENS as HASH_BLOCK, chain_hashes
from ..replica import Sequence
from .serve import ServeDispatcher

MATCH_RATE_THRESHOLD = 0.1       # PrefixCacheAffinityRouter.initialize_state's default
IMBALANCED_THRESHOLD = math.inf  # ... and its imbalanced_threshold default: prefix routing always


class PrefixAffinityDispatcher(ServeDispatcher):
    """Serve's router with the prefix tree in front (module docstring)."""

    def __init__(self, max_ongoing: dict[int, int], seed: int = 0,
                 imbalanced_threshold: float = IMBALANCED_THRESHOLD,
                 match_rate_threshold: float = MATCH_RATE_THRESHOLD):
        super().__init__(max_ongoing, seed)
        self.imbalanced_threshold = imbalanced_threshold
        self.match_rate_threshold = match_rate_threshold
        self.tenants: dict[int, set[int]] = {}      # chain key -> replicas whose tree holds that prefix
        self.size: dict[int, int] = {}              # replica -> tokens in its tree (the tenant's chars)
        self.prefix_routed = 0                      # requests sent by a match (for the report)
        self._chains: dict[str, list[int]] = {}     # request id -> its chain, until it is routed

    def _chain(self, s: Sequence) -> list[int]:
        """The request's chained block keys (one per hash id): prefix k's key depends on ids 0..k.
        Kept from its routing decision until it is routed (the head of the queue may wait)."""
        chain = self._chains.get(s.id)
        if chain is None:
            chain = self._chains[s.id] = chain_hashes(s.req.hash_ids or ())
        return chain

    def _routed(self, s: Sequence, target: int) -> None:
        """Insert ``s``'s text under ``target`` in the tree (Serve's ``on_request_routed``)."""
        chain = self._chain(s)
        del self._chains[s.id]
        new = 0
        for k, key in enumerate(chain):
            holders = self.tenants.setdefault(key, set())
            if target not in holders:
                holders.add(target)
                new += min(HASH_BLOCK, s.req.prompt_tokens - k * HASH_BLOCK)
        # text past the shared blocks (or all of it, without hash_ids) is the tenant's own
        self.size[target] = self.size.get(target, 0) + new + max(0, s.req.prompt_tokens - len(chain) * HASH_BLOCK)

    def _choose_for(self, s: Sequence, live: list[int]) -> int | None:
        if not any(self._accepts(i) for i in live):
            return None
        for i in live:
            self.size.setdefault(i, 0)
        queue = {i: self.ongoing.get(i, 0) for i in live}
        chosen: list[int] = []
        by_match = False
        if max(queue.values()) - min(queue.values()) <= self.imbalanced_threshold:
            chain = self._chain(s)
            matched, holders = 0, set(live)
            for k, key in enumerate(chain):
                h = self.tenants.get(key)
                if not h or not (h & holders):
                    break
                holders &= h
                matched = min((k + 1) * HASH_BLOCK, s.req.prompt_tokens)
            rate = matched / max(1, s.req.prompt_tokens)
            by_match = bool(matched) and rate >= self.match_rate_threshold
            if by_match:
                chosen = sorted(holders)
            else:
                least = min(self.size[i] for i in live)
                chosen = [i for i in live if self.size[i] == least]
        if chosen:
            ok = [i for i in chosen if self._accepts(i)]
            if not ok:
                return None                          # Serve retries the same choice with backoff
            self.prefix_routed += by_match
            return min(ok, key=lambda i: (queue[i], i))
        return self._choose(live)
