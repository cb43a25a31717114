"""Deterministic discrete-event simulator: N replica state machines in virtual time.

The loop has two kinds of events, request arrivals and iteration ends; at each, the same
Router / IterationPolicy / Controller objects the Ray runtime uses make the decisions, and the
cost model gives each iteration's duration. Ties are broken by a sequence number, so the same
inputs always give the same run.

Lengths: a request's sequence is made (and its length predicted) when it arrives; the replica
finishes it at its true length, and only then is the predictor told it (``observe``). When that
moves the predictions (``predictor.version``), every replica's not-yet-started queue is
re-predicted (``Scheduler.repredict``) and the controller rebalances at once, as the Ray driver
does when it learns completions.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from .config import ClusterSpec
from .policies.base import IterationPolicy, Move, Scheduler
from .replica import ReplicaState, Sequence
from .workload import Request


@dataclass(slots=True)
class RunRecord:
    """Everything a run produced: per-request outcomes and per-iteration timelines."""

    policy: str
    config: str
    replicas: list[ReplicaState]
    sequences: list[Sequence]
    moves: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def makespan_s(self) -> float:
        return max((s.finish_s for s in self.sequences), default=0.0)


def start_iteration(r: ReplicaState, policy: IterationPolicy) -> float | None:
    """Ask the policy for the next iteration, validate it; return its modelled duration."""
    while True:
        it = policy.schedule(r)
        if it is None:
            return None
        if r.begin(it) is not None:
            return it.duration(r.cost)


def apply_moves(replicas: list[ReplicaState], moves: list[Move]) -> list[int]:
    """Carry out controller moves; return the indices of replicas that received work."""
    touched = []
    for m in moves:
        taken = replicas[m.src].take_back(m.count)
        if taken:
            replicas[m.dst].add(taken)
            touched.append(m.dst)
    return touched


class Simulator:
    def __init__(self, cluster: ClusterSpec, scheduler: Scheduler):
        self.cluster = cluster
        self.scheduler = scheduler

    def run(self, requests: list[Request]) -> RunRecord:
        sch = self.scheduler
        replicas = [ReplicaState(spec) for spec in self.cluster.replicas()]
        policies = [sch.policy_factory(r) for r in replicas]
        reqs = sorted(requests, key=lambda q: q.arrival_s)          # stable: keeps file order
        seqs: list[Sequence] = []                                   # made as requests arrive
        predictor = sch.predictor
        version = predictor.version
        repredictions = 0
        events: list[tuple[float, int, int]] = []                   # (end time, tiebreak, replica)
        starts = [0.0] * len(replicas)
        tick = 0
        moves = 0
        ctrl = sch.controller
        next_ctrl = 0.0

        def kick(i: int, now: float) -> None:
            nonlocal tick
            r = replicas[i]
            if r.current is not None or not r.has_work:
                return
            dur = start_iteration(r, policies[i])
            if dur is not None:
                starts[i] = now
                tick += 1
                heapq.heappush(events, (now + dur, tick, i))

        def enqueue(pairs: list[tuple[Sequence, int]], now: float) -> None:
            groups: dict[int, list[Sequence]] = {}
            for s, t in pairs:
                groups.setdefault(t, []).append(s)
            for t in sorted(groups):
                replicas[t].add(groups[t])
            for t in sorted(groups):
                kick(t, now)

        k = 0
        n = len(reqs)
        while k < n or events:
            if k < n and (not events or reqs[k].arrival_s <= events[0][0]):
                now = reqs[k].arrival_s
                j = k
                while j < n and reqs[j].arrival_s == now:
                    j += 1
                batch = [sch.make_sequence(q) for q in reqs[k:j]]
                seqs.extend(batch)
                k = j
                loads = [r.report(now) for r in replicas]
                if sch.dispatcher is not None:
                    enqueue(sch.dispatcher.admit(batch, loads), now)
                else:
                    enqueue(list(zip(batch, sch.router.route(batch, loads))), now)
                continue
            now, _, i = heapq.heappop(events)
            r = replicas[i]
            done = r.complete(r.current, starts[i], now)
            if done:
                for s in done:
                    predictor.observe(s.req, s.generated)       # the true length, learned at the finish
                if predictor.version != version:
                    version = predictor.version
                    repredictions += 1
                    for x in replicas:
                        sch.repredict(x)
                    next_ctrl = now                             # the loads moved: rebalance now
            if done and sch.dispatcher is not None:
                enqueue(sch.dispatcher.on_finished(i, done, [x.report(now) for x in replicas]), now)
            if ctrl is not None and now >= next_ctrl:
                next_ctrl = now + ctrl.interval_s
                ms = ctrl.rebalance([r.report(now) for r in replicas], now)
                if ms:
                    moves += sum(m.count for m in ms)
                    for t in apply_moves(replicas, ms):
                        kick(t, now)
            kick(i, now)
        unfinished = [s.id for s in seqs if s.finish_s < 0]
        if unfinished:
            raise RuntimeError(f"simulation ended with {len(unfinished)} unfinished requests, e.g. {unfinished[:5]}")
        return RunRecord(sch.name, self.cluster.source, replicas, seqs, moves,
                         extra={"predictor": predictor.name, "prediction_versions": version,
                                "repredictions": repredictions})


def simulate(cluster: ClusterSpec, scheduler: Scheduler, requests: list[Request]) -> RunRecord:
    return Simulator(cluster, scheduler).run(requests)
