"""A faithful model of Ray Serve's request router in front of LLM replicas, as a baseline (`--policy serve`).

Ray Serve (``ray/serve/_private/request_router/pow_2_router.py``, ``PowerOfTwoChoicesRequestRouter``,
the default router of Ray Serve LLM deployments):

* requests wait in the caller's queue and are routed in FIFO order;
* for each, two replicas are drawn at random; only those that accept (fewer than
  ``max_ongoing_requests`` requests in flight there) are considered, and the one with the shorter
  queue wins; if neither accepts, the draw repeats with backoff until a replica frees a slot;
* a replica's queue length is its number of ongoing (unfinished) requests.

So a replica never holds more than ``max_ongoing_requests`` requests: the rest wait centrally and
go to whichever replica finishes work first, which balances the tails of a batch.

Two named policies use this router:

* ``serve-llm``: Ray Serve LLM as deployed by default. Its deployments get
  ``max_ongoing_requests = DEFAULT_MAX_ONGOING_REQUESTS = int(1e9)``
  (``ray/llm/_internal/serve/constants.py``, env ``RAY_SERVE_LLM_DEFAULT_MAX_ONGOING_REQUESTS``;
  applied by ``DEFAULT_DEPLOYMENT_OPTIONS`` in ``ray/llm/_internal/serve/core/server/builder.py``)
  and Serve's default router, ``DEFAULT_REQUEST_ROUTER_PATH`` =
  ``ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter``
  (``ray/serve/_private/constants.py``). No bound in practice: every request is routed on arrival
  by the two replicas' ongoing counts, and waits in that replica's engine.
* ``serve``: the same router tuned for batch jobs, the bound an operator sets (plain Serve's own
  default is 5, ``DEFAULT_MAX_ONGOING_REQUESTS`` in ``ray/serve/_private/constants.py``): 2 x the
  replica's max batch size (``policy: {serve: {max_ongoing_requests: N}}`` sets it), a full batch
  running and one queued behind it, the strongest setting we measured for batch jobs.

Inside each replica, vLLM v1's scheduler runs the requests (``build_serve`` pairs this dispatcher
with the ``vllm`` engine policy). The random draws come from a seeded generator: runs are
deterministic.
"""
from __future__ import annotations

import random
from collections import deque

from ..replica import LoadReport, Sequence

# Ray Serve LLM's default max_ongoing_requests (Ray 2.60, ray/llm/_internal/serve/constants.py):
# int(1e9), i.e. no bound
SERVE_LLM_MAX_ONGOING_REQUESTS = 1_000_000_000


class ServeDispatcher:
    """Power-of-two-choices routing with bounded replica queues; a central FIFO holds the rest."""

    def __init__(self, max_ongoing: dict[int, int], seed: int = 0, draws: int = 16, order_key=None):
        if any(m < 1 for m in max_ongoing.values()):
            raise ValueError("max_ongoing_requests must be >= 1")
        # None: Serve's FIFO. A key: each arriving batch joins the central queue sorted by it (the
        # hybrid's bounded mode: a batch job's longest requests first, as its plan would start them)
        self.order_key = order_key
        self.max_ongoing = max_ongoing            # replica index -> its bound
        self.rng = random.Random(seed)
        self.draws = draws                        # pairs drawn before falling back to a scan (backoff)
        self.queue: deque[Sequence] = deque()
        self.ongoing: dict[int, int] = {}         # replica index -> requests routed there, unfinished
        self.placed: dict[str, int] = {}          # request id -> replica

    def admit(self, seqs: list[Sequence], loads: list[LoadReport]) -> list[tuple[Sequence, int]]:
        self.queue.extend(seqs if self.order_key is None else sorted(seqs, key=self.order_key))
        return self._dispatch(loads)

    def on_finished(self, replica: int, finished: list[Sequence], loads: list[LoadReport]
                    ) -> list[tuple[Sequence, int]]:
        for s in finished:
            r = self.placed.pop(s.id, None)
            if r is not None:
                self.ongoing[r] -= 1
        return self._dispatch(loads)

    def _dispatch(self, loads: list[LoadReport]) -> list[tuple[Sequence, int]]:
        out: list[tuple[Sequence, int]] = []
        live = [r.index for r in loads]
        while self.queue:
            s = self.queue[0]
            target = self._choose_for(s, live)
            if target is None:
                break                             # no replica takes it yet: wait for a completion
            self.queue.popleft()
            self.ongoing[target] = self.ongoing.get(target, 0) + 1
            self.placed[s.id] = target
            self._routed(s, target)
            out.append((s, target))
        return out

    def _choose_for(self, s: Sequence, live: list[int]) -> int | None:
        """The replica that takes ``s`` now (None: none yet); Serve's default router ignores the request."""
        return self._choose(live)

    def _routed(self, s: Sequence, target: int) -> None:
        """Hears each placement (a router that keeps state on what went where)."""

    def _accepts(self, i: int) -> bool:
        return self.ongoing.get(i, 0) < self.max_ongoing.get(i, 1)

    def _choose(self, live: list[int]) -> int | None:
        if not any(self._accepts(i) for i in live):
            return None
        for _ in range(self.draws):
            pair = self.rng.sample(live, 2) if len(live) >= 2 else live
            ok = [i for i in pair if self._accepts(i)]
            if ok:
                return min(ok, key=lambda i: (self.ongoing.get(i, 0), i))
        # many failed draws: the backoff loop would eventually draw an accepting replica
        ok = [i for i in live if self._accepts(i)]
        return ok[self.rng.randrange(len(ok))]
