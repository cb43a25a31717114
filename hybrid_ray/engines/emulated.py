"""EmulatedEngine: the cost model's iteration time, slept in real time x ``time_scale``.

It paces against a running deadline rather than sleeping each duration afresh: the event loop
oversleeps short timers (epoll has millisecond resolution), and at time_scale 0.02 a 40 ms
modelled iteration is a 0.8 ms sleep, so independent sleeps would drift tens of percent behind.
With a deadline, an oversleep or a moment without CPU is paid back by the next iterations'
shorter sleeps; only after an idle period (``reset_pace``) does the deadline restart from now.
It always yields to the event loop at least once, so the actor answers ``poll``/``add`` even
when the host cannot keep pace (``behind_s`` then says by how much it fell behind).
"""
from __future__ import annotations

import asyncio
import time

from ..replica import Iteration, ReplicaState
from .base import EngineResult


class EmulatedEngine:
    prefix_caching = True      # it sleeps the state's priced iterations: cache hits included

    def __init__(self, time_scale: float):
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.time_scale = time_scale
        self._due = 0.0            # time.monotonic() at which the previous iteration ends
        self.behind_s = 0.0        # the most real seconds an iteration ended after its deadline

    async def execute(self, it: Iteration, state: ReplicaState) -> EngineResult:
        duration = it.duration(state.cost)
        now = time.monotonic()
        self._due = (self._due or now) + duration * self.time_scale
        delay = self._due - now
        await asyncio.sleep(delay if delay > 0 else 0)
        late = time.monotonic() - self._due
        if late > self.behind_s:
            self.behind_s = late
        return EngineResult(duration)

    def reset_pace(self) -> None:
        self._due = 0.0

    def reset(self) -> None:
        """Nothing is held between iterations: a failed step loses nothing here."""
        self._due = 0.0
