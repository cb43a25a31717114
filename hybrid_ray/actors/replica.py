"""ReplicaActor: one ``ReplicaState`` + its iteration policy + an engine, driven in real time.

The loop is the simulator's, one replica at a time: ask the policy (``simulator.start_iteration``,
the very function the simulator calls, so ``begin`` validates the same way), let the engine
execute, ``complete``. It awaits an ``asyncio.Event`` when there is nothing to run, so ``add``,
``take_back`` and ``poll`` are served between iterations on the actor's event loop; no locks are
needed because nothing else runs while an iteration's bookkeeping executes.

Time. Every time recorded in the ``ReplicaState`` is modelled (``clock.py``), and modelled time
excludes the runtime's own overheads (Python between iterations, Ray messages), as in the
simulator: while the replica has work, iterations run back to back (start = previous end), as
the engine would run them, and the engine's pacing keeps real time in step
(``EmulatedEngine.behind_s`` says how far the host fell behind). Work that is added becomes
visible to the policy only when the replica's modelled clock reaches its *visible time*: a
request's arrival (routing is instantaneous in the model, as in the simulator), or the
controller's clock when it moved or recomputed the work. Until then it waits in ``_arriving``,
so a replica that runs behind real time never sees a request before it arrived (which would
let a prefill-first policy stall its batch waiting for it); an idle replica jumps its clock to
the next visible time.

Reports. A ``LoadReport`` is pushed to the controller after every iteration that finished a
request (coalesced to at most one per ``push_gap_s``, 20 ms, so a replica finishing requests
every few hundred microseconds of real time does not flood the controller), when the replica
goes idle, and otherwise every ``report_interval_s`` *real* seconds while busy (real, because
what must keep up with it is the controller's real-time view). Each
push carries ``tag``: the controller's number of the last ``add``/``take_back`` this replica
applied, so the controller can tell which of its own changes a report already reflects. For a
pull-based dispatcher (``report_finished``), every iteration that finished requests pushes at
once, listing them: the dispatcher releases the next block when one completes.

Failed engine steps. An ``execute`` that raises costs the lines the engine held, not the replica:
the engine forgets them (``reset``), the state hands back every sequence that had started
(``ReplicaState.drain_unfinished(started_only=True)``; those never started stay queued), and the
next ``poll`` carries a ``StepFailure``: their ids, those of the failing step's own sequences, and
the error. The driver requeues them from their prompts through the controller, as it does a lost
replica's, and gives a line that was in two failing steps an error line instead
(``actors/driver.py``). An engine without ``reset``, a ``reset`` that raises, or
more than ``MAX_FAILED_STEPS`` failures in a row (no step between ran), stop the loop: the replica
is then lost (the driver's failure path).

Controller generations. The driver replaces a dead or hung controller (``actors/driver.py``) and
points every replica at the new one with ``set_controller(handle, gen)``: the replica answers
with its load and the ids it holds, and from then on ignores ``add`` / ``take_back`` calls of an
older generation, so a stopped controller that wakes up, or an add still in flight from a dead
one, cannot place work the new controller does not know about.
"""
from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..config import ReplicaSpec
from ..engines.factory import Engine, EmulatedEngine, make_engine
from ..engines.base import engine_prefix_caching, whole_seeded_prefill
from ..replica import LoadReport, ReplicaState, Sequence
from ..results import CompletionRecord
from ..simulator import start_iteration
from .clock import ModelClock

log = logging.getLogger(__name__)


MAX_FAILED_STEPS = 3           # engine steps that may fail in a row (none ran between); one more: replica lost


@dataclass(slots=True)
class StepFailure:
    """An engine step raised: the sequences it cost, handed back to the driver to run again."""

    error: str                 # "RuntimeError: ..." (one line)
    ids: list[str]             # every sequence the engine held: restart from their prompts
    blamed: list[str]          # of those, the ones in the failing step (a second time: an error line)


@dataclass(slots=True)
class PollResult:
    """What the driver gets from one ``poll``: completions since the last poll, and the load now."""

    completions: list[CompletionRecord]
    report: LoadReport
    iterations: int
    behind_s: float            # the engine's worst lag behind its real-time schedule (real seconds)
    failures: list[StepFailure] = field(default_factory=list)   # failed engine steps since the last poll


@dataclass(slots=True)
class ReplicaStats:
    name: str
    iterations: int = 0
    pushes: int = 0            # LoadReports pushed to the controller
    adds: int = 0
    take_backs: int = 0
    polls: int = 0
    behind_s: float = 0.0
    added: int = 0             # sequences added
    late: int = 0              # ... that reached it after its modelled clock had run past their visible time
    late_sum_s: float = 0.0    # by how much in all (modelled seconds): Ray latency / time_scale
    late_max_s: float = 0.0
    fenced: int = 0            # sequences refused because an older controller generation sent them
    first_iteration_at: float = 0.0   # real time (time.time()) its first iteration started; 0: none yet
    failed_steps: int = 0      # engine steps that raised (their sequences were handed back)
    stopped: bool = False
    errors: list[str] = field(default_factory=list)


class ReplicaActor:
    def __init__(self, spec: ReplicaSpec, policy_factory: Callable[[ReplicaState], Any], time_scale: float = 1.0,
                 report_interval_s: float = 0.1, engine: Engine | None = None, push_gap_s: float = 0.02,
                 report_finished: bool = False, engine_spec: dict | None = None):
        self.state = ReplicaState(spec)
        self.policy = policy_factory(self.state)
        if engine is None and engine_spec:     # a real engine loads its model here, in the actor's process
            engine = make_engine(time_scale=time_scale, spec=spec, **engine_spec)
        self.engine: Engine = engine if engine is not None else EmulatedEngine(time_scale)
        whole_seeded_prefill(self.engine, self.state)   # an engine that cannot split a seeded prefill
        engine_prefix_caching(self.engine, self.state)  # an engine without a prefix cache: none modelled
        self.report_interval_s = report_interval_s
        # a pull-based dispatcher releases work when sequences finish: tell it at once, and which
        self.report_finished = report_finished
        self._push_gap_s = min(push_gap_s, report_interval_s)
        self.push_gap_s = 0.0 if report_finished else self._push_gap_s
        self._finished: list[Sequence] = []   # finished since the last push (report_finished only)
        self._dirty = False                # completions not yet reported
        self.clock: ModelClock | None = None
        self.t = 0.0                       # modelled end of the last iteration (or start of the run)
        self.controller = None             # ControllerActor handle, set by start()
        self.tag = 0                       # controller's number of the last add/take_back applied
        self.gen = 0                       # controller generation obeyed (older ones are fenced off)
        self.stats = ReplicaStats(spec.name)
        self._arriving: list[tuple[float, int, Sequence]] = []   # (visible at, order, seq), sorted
        self._order = itertools.count()
        self._done: list[CompletionRecord] = []
        self._failures: list[StepFailure] = []     # failed steps not yet polled
        self._handed_back: list[Sequence] = []     # their sequences (drain, set_controller: still ours)
        self._failed_in_a_row = 0
        self._wake = asyncio.Event()       # work was added, or stop was asked
        self._has_done = asyncio.Event()   # completions are waiting for a poll
        self._task: asyncio.Task | None = None
        self._stop = False
        self._last_push = 0.0
        self._started = 0.0                # modelled start of the iteration in flight
        self.predictions = 0               # version of the length predictions its queue was re-predicted with

    # -- lifecycle ------------------------------------------------------------------------------
    async def ready(self) -> str:
        """Answers once the actor is placed and constructed (the runtime waits on it with a timeout)."""
        return self.state.name

    async def start(self, epoch: float, t_first: float, controller=None) -> None:
        """Start the iteration loop at real time ``epoch`` (modelled ``t_first``)."""
        self.clock = ModelClock(epoch, t_first, self.engine.time_scale)
        self.t = t_first
        if self.controller is None:        # a replacement controller may already have been set
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
        out = self.state.drain_unfinished() + [s for _, _, s in self._arriving] + self._handed_back
        self._arriving.clear()
        self._handed_back, self._failures = [], []
        return out

    async def set_policy(self, policy_factory: Callable[[ReplicaState], Any], report_finished: bool) -> None:
        """A new iteration policy from the next iteration on (the full plan's online rule, arriving
        while the run goes on the initial plan's); ``report_finished``: a dispatcher now wants each
        push to list the sequences finished. What has started is untouched."""
        self.policy = policy_factory(self.state)
        self.report_finished = report_finished
        self.push_gap_s = 0.0 if report_finished else self._push_gap_s

    # -- work in and out ------------------------------------------------------------------------
    async def add(self, seqs: list[Sequence], tag: int = 0, at: float | None = None, gen: int = 0) -> int:
        """Queue sequences (routed or moved here); returns how many are queued or arriving.

        ``at``: modelled time of the decision, before which the policy must not see them;
        None = now on the run's clock. Arrivals pass -inf: their own arrival times bound it.
        ``gen``: the sending controller's generation; an older one's add is refused (-1).
        """
        if gen < self.gen:
            self.stats.fenced += len(seqs)
            return -1
        if at is None:
            at = self.clock.now() if self.clock is not None else self.t
        ref = self._started if self.state.current is not None else self.t   # where the model already is
        st = self.stats
        for s in seqs:
            visible = max(at, s.req.arrival_s)
            if visible < ref:
                st.late += 1
                st.late_sum_s += ref - visible
                st.late_max_s = max(st.late_max_s, ref - visible)
            bisect.insort(self._arriving, (visible, next(self._order), s))
        st.added += len(seqs)
        self.tag = max(self.tag, tag)
        self.stats.adds += 1
        self._wake.set()
        return len(self.state.waiting) + len(self._arriving)

    async def take_back(self, count: int, tag: int = 0, gen: int = 0) -> list[Sequence]:
        """Remove up to ``count`` sequences that never started (for the controller's moves).

        Not yet visible ones first (the newest), then the queue's, newest first as the simulator's.
        An older controller generation's call takes nothing.
        """
        if gen < self.gen:
            return []
        self.tag = max(self.tag, tag)
        self.stats.take_backs += 1
        out: list[Sequence] = []
        while self._arriving and len(out) < count:
            out.append(self._arriving.pop()[2])
        if len(out) < count:
            out += self.state.take_back(count - len(out))
        return out

    async def poll(self, wait_s: float = 0.0) -> PollResult:
        """Completions since the last poll; waits up to ``wait_s`` real seconds for the first one.

        The driver long-polls, so a quiet replica costs one message per ``wait_s`` and an answer
        within ``wait_s`` doubles as its heartbeat.
        """
        self.stats.polls += 1
        if self.stats.errors:
            raise RuntimeError(f"{self.state.name}: iteration loop failed: {self.stats.errors[0]}")
        if not self._done and not self._failures and wait_s > 0 and not self._stop:
            self._has_done.clear()
            try:
                await asyncio.wait_for(self._has_done.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        out, self._done = self._done, []
        failures, self._failures, self._handed_back = self._failures, [], []
        return PollResult(out, self.report(), self.stats.iterations, self._behind(), failures)

    async def set_predictions(self, table, rekey: Callable[[Sequence], float] | None, version: int
                              ) -> tuple[LoadReport, int]:
        """New output-length predictions (``table.predict``, version ``version``): re-predict the queued
        sequences that never started, with ``ReplicaState.repredict`` as the simulator does (and those
        not yet visible). Returns the load report and tag after it, for the controller."""
        if version > self.predictions:
            self.predictions = version
            self.state.repredict(table.predict, rekey)
            for _, _, s in self._arriving:
                s.predicted_output = table.predict(s.req)
                if rekey is not None:
                    s.sort_key = rekey(s)
        return self.report(), self.tag

    async def set_controller(self, controller, gen: int) -> tuple[LoadReport, list[str]]:
        """Obey a replacement controller of generation ``gen`` from now on (older ones are fenced off).

        Returns the load now and every id this replica holds: queued, arriving, running, and
        finished (whether or not the driver has polled them yet), so the driver can tell which
        requests were lost with the old controller (sent to it, held nowhere, not finished).
        """
        if gen >= self.gen:
            self.gen = gen
            self.controller = controller
            self.tag = 0                   # the new controller numbers its adds from 1 again
        state = self.state
        held = [s.id for s in state.waiting] + list(state.running) + list(state.prefilling)
        held += [s.id for _, _, s in self._arriving] + [s.id for s in state.finished]
        held += [s.id for s in self._handed_back]          # the driver requeues them at its next poll
        return self.report(), held

    def report(self) -> LoadReport:
        """The state's load report, counting sequences not yet visible as queued."""
        state = self.state
        busy = state.current is not None or state.has_work
        now = self.t if busy or self.clock is None else max(self.t, self.clock.now())
        rep = state.report(now)
        if not self._arriving:
            return rep
        n = len(self._arriving)
        work = sum(state.estimate(s.req.prompt_tokens, s.predicted_output) for _, _, s in self._arriving)
        return replace(rep, waiting=rep.waiting + n, movable=rep.movable + n, queued_work_s=rep.queued_work_s + work,
                       predicted_finish_s=rep.predicted_finish_s + work)

    async def get_stats(self) -> ReplicaStats:
        self.stats.behind_s = self._behind()
        return self.stats

    # -- the loop -------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Make visible what has arrived by the replica's modelled time (in arrival order)."""
        arriving = self._arriving
        k = 0
        while k < len(arriving) and arriving[k][0] <= self.t:
            k += 1
        if k:
            self.state.add([s for _, _, s in arriving[:k]])
            del arriving[:k]

    async def _run(self) -> None:
        assert self.clock is not None
        await self.clock.wait_until(self.clock.t_first)
        state = self.state
        try:
            while not self._stop:
                self._admit()
                if not state.has_work or start_iteration(state, self.policy) is None:
                    if self._arriving:                 # idle until the next visible time
                        nxt = self._arriving[0][0]
                        delay = self.clock.real_at(nxt) - time.time()
                        if delay > 0:                  # sent early: do not run ahead of real time
                            self._wake.clear()
                            try:
                                await asyncio.wait_for(self._wake.wait(), delay)
                            except asyncio.TimeoutError:
                                pass
                            continue
                        self.t = max(self.t, nxt)
                        self.engine.reset_pace()
                        continue
                    self._push()                       # going idle: the controller should know
                    self._wake.clear()
                    await self._wake.wait()
                    self.engine.reset_pace()
                    continue
                it = state.current
                start = self._started = self.t
                if not self.stats.first_iteration_at:
                    self.stats.first_iteration_at = time.time()
                try:
                    res = await self.engine.execute(it, state)
                except Exception as e:             # noqa: BLE001 -- the step's sequences run again
                    self._step_failed(it, e)
                    continue
                self._failed_in_a_row = 0
                end = start + res.duration_s
                done = state.settle(res.completions, state.complete(it, start, end), end)
                self.t = end
                self.stats.iterations += 1
                if done:
                    self._done.extend(CompletionRecord.from_sequence(s) for s in done)
                    self._has_done.set()
                    self._dirty = True
                    if self.report_finished:
                        self._finished.extend(done)
                since = time.time() - self._last_push
                if since >= self.report_interval_s or (self._dirty and since >= self.push_gap_s):
                    self._push()
        except Exception as e:                         # a bug: make it visible to poll, then stop
            self.stats.errors.append(f"{type(e).__name__}: {e}")
            self._stop = True
            raise
        finally:
            self._has_done.set()

    def _step_failed(self, it, e: Exception) -> None:
        """The engine raised in ``execute``: reset it, hand back what it held (module docstring).
        Re-raises (the replica is lost) when the engine cannot be reset or keeps failing."""
        state = self.state
        error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        self._failed_in_a_row += 1
        self.stats.failed_steps += 1
        reset = getattr(self.engine, "reset", None)
        if reset is None or self._failed_in_a_row > MAX_FAILED_STEPS:
            raise e
        blamed = [s.id for s, _ in it.prefill] + ([s.id for s in state.running.values()] if it.decode else [])
        reset()
        lost = state.drain_unfinished(started_only=True)
        log.warning("%s: engine step failed (%s); %d sequences restart from their prompts", state.name, error,
                    len(lost))
        self._handed_back.extend(lost)
        self._failures.append(StepFailure(error, [s.id for s in lost], blamed))
        self.engine.reset_pace()
        self._has_done.set()
        self._push()

    async def _halt(self) -> None:
        self._stop = True
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:                          # noqa: BLE001 -- recorded in stats.errors
                pass
        self.stats.stopped = True

    # -- helpers --------------------------------------------------------------------------------
    def _push(self) -> None:
        self._last_push = time.time()
        self._dirty = False
        if self.controller is None:
            return
        self.stats.pushes += 1
        # fire and forget: Ray delivers calls to a live actor in order
        if self._finished:
            fin, self._finished = self._finished, []
            self.controller.report.remote(self.state.index, self.report(), self.tag, fin)
        else:
            self.controller.report.remote(self.state.index, self.report(), self.tag)

    def _behind(self) -> float:
        return float(getattr(self.engine, "behind_s", 0.0))
