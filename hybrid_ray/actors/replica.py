"""ReplicaActor: one ``ReplicaState`` + its iteration policy + an engine, driven in real time.

The loop is the simulator's, one replica at a time: ask the policy (``simulator.start_iteration``,
the very function the simulator calls, so ``begin`` validates the same way), let the engine
execute, ``complete``. It awaits an ``asyncio.Event`` when there is nothing to run, so ``add``,
``take_back`` and ``poll`` are served between iterations on the actor's event loop; no locks are
needed because nothing else runs while an iteration's bookkeeping executes.

Time. Every time recorded in the ``ReplicaState`` is modelled (``clock.py``). While the replica
has work, iterations run back to back on the modelled axis (start = previous end), exactly as
the engine would run them; host overhead between iterations is not GPU time, and the engine's
pacing keeps real time in step (``EmulatedEngine.behind_s`` says how far it fell behind). After
an idle wait, the next iteration starts at the real time it was woken (``clock.now()``), and
never before the arrival of a request it prefills, so online arrivals see real time.

Reports. A ``LoadReport`` is pushed to the controller after every iteration that finished a
request, when the replica goes idle, and otherwise every ``report_interval_s`` *real* seconds
while busy (real, because what must keep up with it is the controller's real-time view). Each
push carries ``tag``: the controller's number of the last ``add``/``take_back`` this replica
applied, so the controller can tell which of its own changes a report already reflects.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import ReplicaSpec
from ..engines import Engine, EmulatedEngine
from ..replica import LoadReport, ReplicaState, Sequence
from ..results import CompletionRecord
from ..simulator import start_iteration
from .clock import ModelClock


@dataclass(slots=True)
class PollResult:
    """What the driver gets from one ``poll``: completions since the last poll, and the load now."""

    completions: list[CompletionRecord]
    report: LoadReport
    iterations: int
    behind_s: float            # the engine's worst lag behind its real-time schedule (real seconds)


@dataclass(slots=True)
class ReplicaStats:
    name: str
    iterations: int = 0
    pushes: int = 0            # LoadReports pushed to the controller
    adds: int = 0
    take_backs: int = 0
    polls: int = 0
    behind_s: float = 0.0
    stopped: bool = False
    errors: list[str] = field(default_factory=list)


class ReplicaActor:
    def __init__(self, spec: ReplicaSpec, policy_factory: Callable[[ReplicaState], Any], time_scale: float = 1.0,
                 report_interval_s: float = 0.1, engine: Engine | None = None):
        self.state = ReplicaState(spec)
        self.policy = policy_factory(self.state)
        self.engine: Engine = engine if engine is not None else EmulatedEngine(time_scale)
        self.report_interval_s = report_interval_s
        self.clock: ModelClock | None = None
        self.t = 0.0                       # modelled end of the last iteration (or start of the run)
        self.controller = None             # ControllerActor handle, set by start()
        self.tag = 0                       # controller's number of the last add/take_back applied
        self.stats = ReplicaStats(spec.name)
        self._done: list[CompletionRecord] = []
        self._wake = asyncio.Event()       # work was added, or stop was asked
        self._has_done = asyncio.Event()   # completions are waiting for a poll
        self._task: asyncio.Task | None = None
        self._stop = False
        self._last_push = 0.0

    # -- lifecycle ------------------------------------------------------------------------------
    async def ready(self) -> str:
        """Answers once the actor is placed and constructed (the runtime waits on it with a timeout)."""
        return self.state.name

    async def start(self, epoch: float, t_first: float, controller=None) -> None:
        """Start the iteration loop at real time ``epoch`` (modelled ``t_first``)."""
        self.clock = ModelClock(epoch, t_first, self.engine.time_scale)
        self.t = t_first
        self.controller = controller
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def finish(self) -> ReplicaState:
        """Stop the loop (after the iteration in flight) and return the state, for metrics."""
        await self._halt()
        return self.state

    async def drain(self) -> list[Sequence]:
        """Stop the loop and hand back every unfinished sequence, reset for recompute elsewhere.

        For retiring a replica; the replica runs nothing afterwards.
        """
        await self._halt()
        return self.state.drain_unfinished()

    # -- work in and out ------------------------------------------------------------------------
    async def add(self, seqs: list[Sequence], tag: int = 0) -> int:
        """Queue sequences (routed or moved here); returns the number waiting."""
        self.state.add(seqs)
        self.tag = max(self.tag, tag)
        self.stats.adds += 1
        self._wake.set()
        return len(self.state.waiting)

    async def take_back(self, count: int, tag: int = 0) -> list[Sequence]:
        """Remove up to ``count`` waiting sequences that never started (for the controller's moves)."""
        self.tag = max(self.tag, tag)
        self.stats.take_backs += 1
        return self.state.take_back(count)

    async def poll(self, wait_s: float = 0.0) -> PollResult:
        """Completions since the last poll; waits up to ``wait_s`` real seconds for the first one.

        The driver long-polls, so a quiet replica costs one message per ``wait_s`` and an answer
        within ``wait_s`` doubles as its heartbeat.
        """
        self.stats.polls += 1
        if self.stats.errors:
            raise RuntimeError(f"{self.state.name}: iteration loop failed: {self.stats.errors[0]}")
        if not self._done and wait_s > 0 and not self._stop:
            self._has_done.clear()
            try:
                await asyncio.wait_for(self._has_done.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        out, self._done = self._done, []
        return PollResult(out, self.report(), self.stats.iterations, self._behind())

    def report(self) -> LoadReport:
        return self.state.report(self._now_for_report())

    async def get_stats(self) -> ReplicaStats:
        self.stats.behind_s = self._behind()
        return self.stats

    # -- the loop -------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self.clock is not None
        await self.clock.wait_until(self.clock.t_first)
        woke = False
        state = self.state
        try:
            while not self._stop:
                if not state.has_work or start_iteration(state, self.policy) is None:
                    self._push()                       # going idle: the controller should know
                    self._wake.clear()
                    await self._wake.wait()
                    woke = True
                    continue
                it = state.current
                start = self.t
                if woke:                               # idle until now: real time passed
                    start = max(start, self.clock.now())
                    self.engine.reset_pace()
                    woke = False
                for s, _ in it.prefill:                # causality: not before a request arrives
                    if s.req.arrival_s > start:
                        start = s.req.arrival_s
                res = await self.engine.execute(it, state)
                end = start + res.duration_s
                done = state.complete(it, start, end)
                for sid in res.finished_early:
                    s = state.running.get(sid)
                    if s is not None:
                        state.finish_early(s, end)
                        done.append(s)
                self.t = end
                self.stats.iterations += 1
                if done:
                    self._done.extend(CompletionRecord.from_sequence(s) for s in done)
                    self._has_done.set()
                    self._push()
                elif time.time() - self._last_push >= self.report_interval_s:
                    self._push()
        except Exception as e:                         # a bug: make it visible to poll, then stop
            self.stats.errors.append(f"{type(e).__name__}: {e}")
            self._stop = True
            raise
        finally:
            self._has_done.set()

    async def _halt(self) -> None:
        self._stop = True
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:
                pass
        self.stats.stopped = True

    # -- helpers --------------------------------------------------------------------------------
    def _now_for_report(self) -> float:
        if self.clock is None:
            return self.t
        if self.state.current is not None or self.state.has_work:
            return self.t                              # busy: the modelled axis is the replica's own
        return max(self.t, self.clock.now())

    def _push(self) -> None:
        self._last_push = time.time()
        if self.controller is None:
            return
        self.stats.pushes += 1
        # fire and forget: a lost report is superseded by the next one
        self.controller.report.remote(self.state.index, self.report(), self.tag)

    def _behind(self) -> float:
        return float(getattr(self.engine, "behind_s", 0.0))
