"""ControllerActor: the scheduler's router and controller objects, fed by the replicas' load reports.

It makes no decision of its own: ``route`` calls ``scheduler.router.route`` on the latest reports
and ``rebalance`` calls ``scheduler.controller.rebalance`` every ``interval_s`` modelled seconds;
the actor only carries the decisions out (``add``, ``take_back`` + ``add``) and keeps books:

* the latest report of each replica, plus the adds and take-backs it sent since (a report says,
  by its ``tag``, which of them it reflects), so two routing calls a few milliseconds apart do
  not both see an empty replica;
* where every request was last sent (``where``), so that when a replica dies the driver learns
  which requests to recompute (``replica_failed``);
* decision latencies (wall time of each router / controller call) and message counts.

A failed replica looks, to the router, infinitely loaded and with nothing to move, and the
controller does not see it at all. If a router still picks it (round robin, or a plan made
before the failure), the request goes to the least-loaded live replica instead (the baseline's
``LeastLoadedRouter``).
"""
from __future__ import annotations

import asyncio
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
    rerouted_from_dead: int = 0
    dead: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Delta:
    tag: int
    waiting: int
    work_s: float


class ControllerActor:
    def __init__(self, cluster: ClusterSpec, router, controller, replicas: list, time_scale: float,
                 call_timeout_s: float = 30.0):
        self.specs = cluster.replicas()
        self.router = router
        self.ctrl = controller
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
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._stop = False

    # -- lifecycle ------------------------------------------------------------------------------
    async def ready(self) -> bool:
        return True

    async def start(self, epoch: float, t_first: float) -> None:
        self.clock = ModelClock(epoch, t_first, self.time_scale)
        self.reports = [replace(r, now=t_first, predicted_finish_s=t_first + r.queued_work_s + r.running_work_s)
                        for r in self.reports]
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
        return self.get_stats()

    def get_stats(self) -> ControllerStats:
        self.stats.messages = dict(self.msgs)
        self.stats.dead = sorted(self.dead)
        return self.stats

    # -- inputs ---------------------------------------------------------------------------------
    def report(self, index: int, rep: LoadReport, tag: int) -> None:
        """A replica's pushed load; kept if at least as new as the stored one."""
        self.msgs["report"] += 1
        if index in self.dead or tag < self.report_tag[index]:
            return
        if tag == self.report_tag[index] and rep.now < self.reports[index].now:
            return
        self.reports[index] = rep
        self.report_tag[index] = tag
        self.deltas[index] = [d for d in self.deltas[index] if d.tag > tag]

    async def route(self, seqs: list[Sequence]) -> list[int]:
        """Route newly arrived sequences with the scheduler's router; returns each one's replica."""
        self.msgs["route"] += 1
        async with self._lock:
            return await self._route(seqs, at=float("-inf"))

    async def requeue(self, seqs: list[Sequence]) -> list[int]:
        """Route fresh copies of a failed replica's unfinished requests over the live replicas."""
        self.msgs["requeue"] += 1
        async with self._lock:
            return await self._route(seqs, at=self.clock.now() if self.clock else None)

    async def replica_failed(self, index: int) -> list[str]:
        """Mark a replica dead; return the ids last sent there (the driver drops finished ones)."""
        self.msgs["replica_failed"] += 1
        async with self._lock:
            self.dead.add(index)
            self.deltas[index] = []
            return [rid for rid, i in self.where.items() if i == index]

    def loads(self) -> list[LoadReport]:
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
    async def _route(self, seqs: list[Sequence], at: float | None) -> list[int]:
        if not seqs:
            return []
        loads = self.loads()
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
        groups: dict[int, list[Sequence]] = {}
        for s, t in zip(seqs, targets):
            groups.setdefault(t, []).append(s)
        await asyncio.gather(*(self._add(t, group, at) for t, group in sorted(groups.items())))
        return targets

    async def _add(self, i: int, seqs: list[Sequence], at: float | None) -> bool:
        """Send ``seqs`` to replica ``i``; on failure they stay booked there, for the driver's requeue."""
        self.next_tag[i] += 1
        tag = self.next_tag[i]
        spec = self.specs[i]
        g = spec.group
        work = sum(sequence_work(g.cost_model, g.max_batch_size, g.kv_capacity_tokens, s.req.prompt_tokens,
                                 s.predicted_output) for s in seqs)
        self.deltas[i].append(_Delta(tag, len(seqs), work))
        for s in seqs:
            self.where[s.id] = i
        self.msgs["add"] += 1
        try:
            await self._call(self.handles[i].add.remote(seqs, tag, at))
            return True
        except Exception:
            self.dead.add(i)             # the driver confirms through its own poll and requeues
            return False

    async def _rebalance_loop(self) -> None:
        assert self.clock is not None
        period = max(self.ctrl.interval_s * self.time_scale, 0.001)
        while not self._stop:
            await asyncio.sleep(period)
            async with self._lock:
                await self._rebalance()

    async def _rebalance(self) -> None:
        loads = [r for r in self.loads() if r.index not in self.dead]   # controllers pair replicas by .index
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
                taken = await self._call(self.handles[m.src].take_back.remote(m.count, tag))
            except Exception:
                self.dead.add(m.src)
                continue
            if not taken:
                continue
            if self.report_tag[m.src] < tag:
                g = self.specs[m.src].group
                work = sum(sequence_work(g.cost_model, g.max_batch_size, g.kv_capacity_tokens, s.req.prompt_tokens,
                                         s.predicted_output) for s in taken)
                self.deltas[m.src].append(_Delta(tag, -len(taken), -work))
            self.stats.moves += len(taken)
            await self._add(m.dst, taken, now)

    async def _call(self, ref):
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.call_timeout_s)
