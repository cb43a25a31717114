"""ControllerActor: the scheduler's router and controller objects, fed by the replicas' load reports.

It makes no decision of its own: ``route`` calls ``scheduler.router.route`` on the latest reports
(or, for pull-based policies, ``scheduler.dispatcher.admit``, and ``dispatcher.on_finished`` when
a replica's push lists finished sequences) and ``rebalance`` calls
``scheduler.controller.rebalance`` every ``interval_s`` modelled seconds; the actor only carries
the decisions out (``add``, ``take_back`` + ``add``) and keeps books:

* the latest report of each replica, plus the adds and take-backs it sent since (a report says,
  by its ``tag``, which of them it reflects), so two routing calls a few milliseconds apart do
  not both see an empty replica;
* where every request was last sent (``where``), so that when a replica dies the driver learns
  which requests to recompute (``replica_failed``);
* decision latencies (wall time of each router / controller call) and message counts.

When the driver's length predictor learns from completions and its predictions move, it hands the
new table to ``set_predictions``: the controller pushes it to every live replica (each re-predicts
its not-yet-started queue and answers with its new load) and rebalances at once on those loads.

A failed replica looks, to the router, infinitely loaded and with nothing to move, and the
controller does not see it at all. If a router still picks it (round robin, or a plan made
before the failure), the request goes to the least-loaded live replica instead (the baseline's
``LeastLoadedRouter``).

The full plan, when it arrives mid-run (``run`` starts on a fast initial plan while the planner
works), comes through ``apply_plan``: the new router, controller and dispatcher replace the old, and
every sequence that has not started is taken back from every replica and placed anew by them (the
moves' own ``take_back`` + ``add``); started ones stay where they are.

Failures of the controller itself. The driver pings it (``ping``, its heartbeat, which also
carries its move and message counts) and replaces it when it dies or stops answering: the new
actor has the next *generation* number, which it sends with every ``add`` and ``take_back`` (the
replicas refuse an older generation's), and ``rebuild`` hands it the replicas' loads and the
ids each holds, the failed replicas and the run's clock. Its other books start empty: the
router, controller and dispatcher objects are fresh copies of the scheduler's, and requests the
old controller held or had in flight are requeued by the driver.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace

from ..config import ClusterSpec
from ..planner.estimate import sequence_work
from ..policies.routing import LeastLoadedRouter
from ..replica import LoadReport, Sequence
from .clock import ModelClock

DEAD_LOAD = 10 ** 9                # outstanding requests a failed replica appears to have
DEAD_WORK_S = 1e12                 # and seconds of queued work


class NoLiveReplicaError(RuntimeError):
    """Every replica has failed (as far as the controller can tell): nothing can be routed."""


@dataclass(slots=True)
class ControllerStats:
    route_latency_s: list[float] = field(default_factory=list)      # wall time of each router call
    rebalance_latency_s: list[float] = field(default_factory=list)  # wall time of each controller call
    messages: dict = field(default_factory=dict)                    # received / sent, by method
    moves: int = 0                                                  # sequences moved
    prediction_updates: int = 0                                     # prediction tables pushed to replicas
    rerouted_from_dead: int = 0
    dead: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(slots=True)
class PlanApplied:
    """What ``apply_plan`` did: sequences taken back (never started) and re-placed, how many of them
    changed replica, and where the requests it left alone are booked (started, finished, or in flight)."""

    taken: int = 0
    moved: int = 0
    held_back: int = 0                                        # kept by a dispatcher, released later
    kept: dict[str, int] = field(default_factory=dict)       # request id -> replica index


TAKE_ALL = 1 << 40                 # take_back count meaning "every sequence that has not started"


@dataclass(slots=True)
class _Delta:
    tag: int
    waiting: int
    work_s: float


class ControllerActor:
    def __init__(self, cluster: ClusterSpec, router, controller, replicas: list, time_scale: float,
                 call_timeout_s: float = 30.0, dispatcher=None, generation: int = 0):
        self.gen = generation              # sent with every add / take_back: replicas fence off older ones
        self.specs = cluster.replicas()
        self.router = router
        self.ctrl = controller
        self.dispatcher = dispatcher        # pull-based dispatch replaces the router when set
        self.dispatched: set[str] = set()   # ids the dispatcher placed (and expects on_finished for)
        self.fallback = LeastLoadedRouter()
        self.handles = list(replicas)
        self.time_scale = time_scale
        self.call_timeout_s = call_timeout_s
        n = len(self.specs)
        self.reports: list[LoadReport] = [LoadReport(s.index, s.name, 0.0, 0, 0, 0, 0.0, 0.0, 0.0) for s in self.specs]
        self.report_tag = [0] * n          # tag of each stored report
        self.next_tag = [0] * n
        self.deltas: list[list[_Delta]] = [[] for _ in range(n)]
        self.dead: set[int] = set()
        self.where: dict[str, int] = {}
        self.stats = ControllerStats()
        self.msgs: Counter = Counter()
        self.clock: ModelClock | None = None
        self._task: asyncio.Task | None = None
        self._stop = False
        self._rebalancing = asyncio.Lock()  # one rebalance at a time (periodic, or after new predictions)

    # -- lifecycle ------------------------------------------------------------------------------
    async def ready(self) -> int:
        """Answers once placed; returns the actor's process id (fault tests signal it)."""
        return os.getpid()

    async def ping(self) -> tuple[int, dict]:
        """The driver's heartbeat; returns the moves and messages so far (kept if this actor is lost)."""
        return self.stats.moves, dict(self.msgs)

    async def start(self, epoch: float, t_first: float) -> None:
        self.clock = ModelClock(epoch, t_first, self.time_scale)
        self.reports = [replace(r, now=t_first, predicted_finish_s=t_first + r.queued_work_s + r.running_work_s)
                        for r in self.reports]
        self._start_loop()

    async def rebuild(self, held: dict[int, tuple[LoadReport, list[str]]], dead: list[int],
                      epoch: float | None, t_first: float, routed: int = 0) -> None:
        """Take over from a lost controller: each live replica's load and the ids it holds (its tag
        count restarts at 0, as the replica's did in ``set_controller``), the failed replicas, and,
        if the run has started, its clock. ``routed``: arrivals the lost controllers were given (a
        dispatcher that counts rows, e.g. Ray Data's, must still cut its last partial block)."""
        self.dead = set(dead)
        if self.dispatcher is not None and hasattr(self.dispatcher, "seen"):
            self.dispatcher.seen = routed
        for i, (rep, ids) in held.items():
            self.reports[i], self.report_tag[i], self.next_tag[i], self.deltas[i] = rep, 0, 0, []
            for rid in ids:
                self.where[rid] = i
        if epoch is not None:
            self.clock = ModelClock(epoch, t_first, self.time_scale)
            self._start_loop()

    def _start_loop(self) -> None:
        if self.ctrl is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._rebalance_loop())

    async def stop(self) -> ControllerStats:
        self._stop = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        return self._stats()

    def _stats(self) -> ControllerStats:
        self.stats.messages = dict(self.msgs)
        self.stats.dead = sorted(self.dead)
        return self.stats

    # -- the full plan, arriving while the run goes on the initial one ----------------------------
    async def apply_plan(self, router, controller, dispatcher, sort_key, move: bool = True) -> PlanApplied:
        """Switch to the full plan's router, controller and dispatcher; with ``move``, take back every
        sequence that has not started from every live replica (the existing move path: ``take_back``
        + ``add``), give it the new plan's queue key (``sort_key``) and place it anew: where the new
        router puts it, or through the new dispatcher. Started sequences stay where they are.

        Held under the rebalancing lock, so no rebalance interleaves. A replica that fails meanwhile
        keeps its books here (the driver requeues its requests, as after any failed take-back)."""
        self.msgs["apply_plan"] += 1
        out = PlanApplied()
        async with self._rebalancing:
            # what the old dispatcher still holds back centrally (the hybrid's late binding: Serve's
            # queue) is placed anew with the rest
            queue = getattr(self.dispatcher, "queue", None)
            held = list(queue) if queue is not None and move else []
            if held:
                queue.clear()
            self.router, self.ctrl, self.dispatcher = router, controller, dispatcher
            self.dispatched = set()
            if self.clock is not None and self._task is not None and self._task.done():
                self._task = None
            if self.clock is not None:
                self._start_loop()                 # a controller where the initial plan had none
            if not move:
                return out
            live = [i for i in range(len(self.handles)) if i not in self.dead]
            now = self.clock.now() if self.clock is not None else float("-inf")
            tags = {}
            for i in live:
                self.next_tag[i] += 1
                tags[i] = self.next_tag[i]
            self.msgs["take_back"] += len(live)
            answers = await asyncio.gather(*(self._call(self.handles[i].take_back.remote(TAKE_ALL, tags[i], self.gen))
                                             for i in live), return_exceptions=True)
            seqs: list[Sequence] = []
            origin: dict[str, int] = {}
            for i, taken in zip(live, answers):
                if isinstance(taken, BaseException):
                    self.dead.add(i)               # its requests stay booked there: the driver requeues
                    continue
                if not taken:
                    continue
                if self.report_tag[i] < tags[i]:
                    self._book(i, tags[i], taken, -1)
                for s in taken:
                    origin[s.id] = i
                seqs.extend(taken)
            out.kept = {rid: i for rid, i in self.where.items() if rid not in origin}
            for s in held:
                origin[s.id] = -1                  # on no replica: any placement moves it
            seqs.extend(held)
            out.taken = len(seqs)
            if sort_key is not None:
                for s in seqs:
                    s.sort_key = sort_key(s)
            seqs.sort(key=lambda s: origin[s.id])  # a stable order for the router's greedy fallback
            if not seqs:
                return out
            if self.dispatcher is not None:
                t0 = time.perf_counter()
                pairs = self.dispatcher.admit(seqs, self._live_loads())
                self.stats.route_latency_s.append(time.perf_counter() - t0)
                placed = {s.id for s, _ in pairs}
                self.dispatched.update(placed)
                for s in seqs:                     # held back: booked nowhere until released
                    if s.id not in placed:
                        self.where.pop(s.id, None)
                out.held_back = len(seqs) - len(placed)
                out.moved = (sum(t != origin[s.id] for s, t in pairs)       # placed elsewhere, or off a replica
                             + sum(s.id not in placed and origin[s.id] >= 0 for s in seqs))
                await self._place(pairs, now)
            else:
                targets = await self._route(seqs, now)
                out.moved = sum(t != origin[s.id] for s, t in zip(seqs, targets))
        return out

    # -- inputs ---------------------------------------------------------------------------------
    async def report(self, index: int, rep: LoadReport, tag: int, finished: list[Sequence] | None = None) -> None:
        """A replica's pushed load (kept if at least as new as the stored one), and, for a
        dispatcher, the sequences it finished since its last push."""
        self.msgs["report"] += 1
        if index in self.dead:
            return
        self._store(index, rep, tag)
        if finished and self.dispatcher is not None:
            mine = [s for s in finished if s.id in self.dispatched]
            if mine:
                self.dispatched.difference_update(s.id for s in mine)
                t0 = time.perf_counter()
                pairs = self.dispatcher.on_finished(index, mine, self._live_loads())
                self.stats.route_latency_s.append(time.perf_counter() - t0)
                self.dispatched.update(s.id for s, _ in pairs)
                await self._place(pairs, max(s.finish_s for s in mine))

    async def set_predictions(self, table, rekey, version: int) -> int:
        """Push new length predictions to the live replicas, take their re-predicted loads, and
        rebalance now (the loads moved). Returns how many replicas applied them."""
        self.msgs["set_predictions"] += 1
        live = [i for i in range(len(self.handles)) if i not in self.dead]
        self.msgs["repredict"] += len(live)
        answers = await asyncio.gather(*(self._call(self.handles[i].set_predictions.remote(table, rekey, version))
                                         for i in live), return_exceptions=True)
        applied = 0
        for i, ans in zip(live, answers):
            if isinstance(ans, BaseException):
                continue                  # dead or hung: the driver's poll finds out
            rep, tag = ans
            self._store(i, rep, tag)
            applied += 1
        self.stats.prediction_updates += 1
        if self.ctrl is not None and self.clock is not None and applied:
            try:
                async with self._rebalancing:
                    await self._rebalance()
            except NoLiveReplicaError:
                pass
            except Exception as e:       # noqa: BLE001 -- as in the periodic loop: keep routing
                self.stats.errors.append(f"{type(e).__name__}: {e}")
        return applied

    async def route(self, seqs: list[Sequence]) -> list[int]:
        """Route newly arrived sequences with the scheduler's router (or dispatcher); returns targets."""
        self.msgs["route"] += 1
        if self.dispatcher is not None:
            t0 = time.perf_counter()
            pairs = self.dispatcher.admit(seqs, self._live_loads())
            self.stats.route_latency_s.append(time.perf_counter() - t0)
            self.dispatched.update(s.id for s, _ in pairs)
            placed = {s.id: t for s, t in pairs}
            await self._place(pairs, float("-inf"))
            return [placed.get(s.id, -1) for s in seqs]       # -1: held back by the dispatcher
        return await self._route(seqs, at=float("-inf"))

    async def requeue(self, seqs: list[Sequence]) -> list[int]:
        """Route fresh copies of a failed replica's unfinished requests over the live replicas.

        With a dispatcher they go to the least-loaded live replica outside its blocks (the
        dispatcher's book-keeping of a lost block cannot be redone).
        """
        self.msgs["requeue"] += 1
        at = self.clock.now() if self.clock else None
        if self.dispatcher is not None:
            self.dispatched.difference_update(s.id for s in seqs)
            live = self._live_loads()
            if not live:
                raise NoLiveReplicaError(f"no live replica to route {len(seqs)} requests to")
            targets = self.fallback.route(seqs, live)
            await self._place(list(zip(seqs, targets)), at)
            return targets
        return await self._route(seqs, at=at)

    async def replica_failed(self, index: int) -> list[str]:
        """Mark a replica dead; return the ids last sent there (the driver drops finished ones)."""
        self.msgs["replica_failed"] += 1
        self.dead.add(index)
        self.deltas[index] = []
        return [rid for rid, i in self.where.items() if i == index]

    def _store(self, index: int, rep: LoadReport, tag: int) -> None:
        """Keep a replica's report if it is at least as new as the stored one."""
        if index in self.dead:
            return
        if tag > self.report_tag[index] or (tag == self.report_tag[index] and rep.now >= self.reports[index].now):
            self.reports[index] = rep
            self.report_tag[index] = tag
            self.deltas[index] = [d for d in self.deltas[index] if d.tag > tag]

    def _loads(self) -> list[LoadReport]:
        """What the router and controller see: latest reports + changes sent since, dead ones inflated."""
        out = []
        for i, r in enumerate(self.reports):
            if i in self.dead:
                out.append(replace(r, waiting=DEAD_LOAD, running=0, movable=0, queued_work_s=DEAD_WORK_S,
                                   running_work_s=0.0, predicted_finish_s=DEAD_WORK_S))
                continue
            if self.deltas[i]:
                dw = sum(d.waiting for d in self.deltas[i])
                ds = sum(d.work_s for d in self.deltas[i])
                r = replace(r, waiting=max(0, r.waiting + dw), movable=max(0, r.movable + dw),
                            queued_work_s=max(0.0, r.queued_work_s + ds),
                            predicted_finish_s=r.predicted_finish_s + ds)
            out.append(r)
        return out

    # -- decisions carried out --------------------------------------------------------------------
    # Decisions and their bookkeeping (deltas, ``where``) happen without an ``await`` in between,
    # so concurrent calls on the actor's event loop never see half of one; the adds then travel
    # while the next decision is made (Ray keeps calls to one replica in order).
    async def _route(self, seqs: list[Sequence], at: float | None) -> list[int]:
        if not seqs:
            return []
        loads = self._loads()
        t0 = time.perf_counter()
        targets = list(self.router.route(seqs, loads))
        self.stats.route_latency_s.append(time.perf_counter() - t0)
        bad = [k for k, t in enumerate(targets) if t in self.dead or not 0 <= t < len(self.specs)]
        if bad:
            live = [r for r in loads if r.index not in self.dead]
            if not live:
                raise NoLiveReplicaError(f"no live replica to route {len(seqs)} requests to")
            for k, t in zip(bad, self.fallback.route([seqs[k] for k in bad], live)):
                targets[k] = t
            self.stats.rerouted_from_dead += len(bad)
        await self._place(list(zip(seqs, targets)), at)
        return targets

    async def _place(self, pairs: list[tuple[Sequence, int]], at: float | None) -> None:
        """Send (sequence, replica) decisions, one add per replica, and wait until they landed."""
        groups: dict[int, list[Sequence]] = {}
        for s, t in pairs:
            groups.setdefault(t, []).append(s)
        sent = [(t, self._send(t, group, at)) for t, group in sorted(groups.items())]
        await asyncio.gather(*(self._settle(t, ref) for t, ref in sent))

    def _live_loads(self) -> list[LoadReport]:
        return [r for r in self._loads() if r.index not in self.dead]

    def _book(self, i: int, tag: int, seqs: list[Sequence], sign: int) -> None:
        """Count ``seqs`` onto (``sign`` +1) or off (-1) replica ``i``'s load until its report of
        ``tag`` arrives: their number and their estimated work on its group."""
        g = self.specs[i].group
        work = sum(sequence_work(g.cost_model, g.max_batch_size, g.kv_capacity_tokens, s.req.prompt_tokens,
                                 s.predicted_output) for s in seqs)
        self.deltas[i].append(_Delta(tag, sign * len(seqs), sign * work))

    def _send(self, i: int, seqs: list[Sequence], at: float | None):
        """Book ``seqs`` on replica ``i`` and send them; they stay booked there if it fails (driver requeues)."""
        self.next_tag[i] += 1
        tag = self.next_tag[i]
        self._book(i, tag, seqs, +1)
        for s in seqs:
            self.where[s.id] = i
        self.msgs["add"] += 1
        return self.handles[i].add.remote(seqs, tag, at, self.gen)

    async def _settle(self, i: int, ref) -> bool:
        try:
            await self._call(ref)
            return True
        except Exception:                # noqa: BLE001 -- dead or hung: the driver confirms and requeues
            self.dead.add(i)
            return False

    async def _rebalance_loop(self) -> None:
        assert self.clock is not None
        while not self._stop and self.ctrl is not None:
            await asyncio.sleep(max(self.ctrl.interval_s * self.time_scale, 0.001))   # apply_plan may swap it
            if self.ctrl is None:
                return
            try:
                async with self._rebalancing:
                    await self._rebalance()
            except NoLiveReplicaError:
                return
            except Exception as e:       # noqa: BLE001 -- keep routing even if one rebalance failed
                self.stats.errors.append(f"{type(e).__name__}: {e}")

    async def _rebalance(self) -> None:
        if self.ctrl is None:            # apply_plan switched to a plan without one
            return
        loads = self._live_loads()       # controllers pair replicas by .index: the dead are left out
        now = self.clock.now()
        t0 = time.perf_counter()
        moves = self.ctrl.rebalance(loads, now)
        self.stats.rebalance_latency_s.append(time.perf_counter() - t0)
        for m in moves or ():
            if m.src == m.dst or m.src in self.dead or m.dst in self.dead or m.count <= 0:
                continue
            self.next_tag[m.src] += 1
            tag = self.next_tag[m.src]
            self.msgs["take_back"] += 1
            try:
                taken = await self._call(self.handles[m.src].take_back.remote(m.count, tag, self.gen))
            except Exception:            # noqa: BLE001 -- its requests stay booked there: requeued
                self.dead.add(m.src)
                continue
            if not taken:
                continue
            if self.report_tag[m.src] < tag:
                self._book(m.src, tag, taken, -1)
            self.stats.moves += len(taken)
            if m.dst in self.dead:       # died while we took the work back: the router places it
                await self._route(taken, now)
            else:
                await self._settle(m.dst, self._send(m.dst, taken, now))

    async def _call(self, ref):
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.call_timeout_s)
