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

Model error (``CostNoise``, ``hybrid-ray simulate --cost-noise SIGMA``): the simulated engines'
iterations then take the cost model's time times a seeded noise factor, while the replica state,
the planner and every policy keep pricing them with the nominal cost model; only the simulated clock
(and so the records' start and end times) sees the noise.
"""
from __future__ import annotations

import heapq
import math
import random
import time
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


class CostNoise:
    """How far the simulated engines' iteration times stray from the cost model (model error).

    Replica ``i``'s iteration takes ``nominal x factor(i)``, with ``factor(i) = bias_i x eps``:
    ``bias_i = exp(sigma z_i)`` is drawn once per replica and kept for the run (a lognormal with
    median 1: a replica systematically slower or faster than its profile), and ``eps =
    exp(sigma z - sigma^2 / 2)`` is drawn afresh for every iteration (a lognormal with mean 1:
    jitter). ``z`` are standard normals from one stream per replica seeded by ``(seed, i)``, so a
    replica's draws depend on neither the other replicas nor the order the events interleave:
    deterministic given the seed. ``sigma = 0`` is the exact model (every factor exactly 1.0).

    The simulator asks for one factor per iteration it starts (``Simulator(noise=...)``); nothing
    else sees it. ``fresh()`` restarts the streams, so one ``CostNoise`` given to two runs draws the
    same factors in both.
    """

    __slots__ = ("sigma", "seed", "_rng", "_bias")

    def __init__(self, sigma: float, seed: int = 0):
        sigma = float(sigma)
        if not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"cost noise sigma must be a finite number >= 0, got {sigma!r}")
        self.sigma = sigma
        self.seed = int(seed)
        self._rng: dict[int, random.Random] = {}
        self._bias: dict[int, float] = {}

    def fresh(self) -> "CostNoise":
        """The same noise from the start of its streams (what each run uses)."""
        return CostNoise(self.sigma, self.seed)

    def _stream(self, i: int) -> random.Random:
        rng = self._rng.get(i)
        if rng is None:
            # a string seed is hashed with SHA-512 (random.seed version 2): the same on every platform
            rng = self._rng[i] = random.Random(f"hybrid-ray cost noise {self.seed} {i}")
            self._bias[i] = math.exp(self.sigma * rng.gauss(0.0, 1.0))     # the replica's first draw
        return rng

    def bias(self, i: int) -> float:
        """Replica ``i``'s fixed factor (1.0 without noise)."""
        if self.sigma == 0.0:
            return 1.0
        self._stream(i)
        return self._bias[i]

    def factor(self, i: int) -> float:
        """The next iteration of replica ``i`` takes the cost model's time times this."""
        if self.sigma == 0.0:
            return 1.0
        rng = self._stream(i)
        s = self.sigma
        return self._bias[i] * math.exp(s * rng.gauss(0.0, 1.0) - 0.5 * s * s)


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


class DeadlinePassed(Exception):
    """A simulation cut at its wall-clock deadline (an anytime planner's candidate run out of time)."""


class Simulator:
    def __init__(self, cluster: ClusterSpec, scheduler: Scheduler, noise: CostNoise | None = None,
                 deadline: float | None = None):
        self.cluster = cluster
        self.scheduler = scheduler
        self.deadline = deadline            # time.perf_counter() value past which run() raises DeadlinePassed
        # model error: None or sigma 0 is the exact cost model (the same run, bit for bit)
        self.noise = noise if noise is not None and noise.sigma > 0 else None

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
        noise = self.noise.fresh() if self.noise is not None else None

        def kick(i: int, now: float) -> None:
            nonlocal tick
            r = replicas[i]
            if r.current is not None or not r.has_work:
                return
            dur = start_iteration(r, policies[i])
            if dur is not None:
                if noise is not None:
                    dur *= noise.factor(i)          # only the clock sees it: the state prices nominally
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
        deadline, events_done = self.deadline, 0
        while k < n or events:
            if deadline is not None:
                events_done += 1
                if events_done & 1023 == 1 and time.perf_counter() > deadline:    # the first, then every 1024th
                    raise DeadlinePassed(f"simulation cut at its deadline after {events_done} events")
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
        extra = {"predictor": predictor.name, "prediction_versions": version, "repredictions": repredictions}
        if noise is not None:
            extra["cost_noise"] = {"sigma": noise.sigma, "seed": noise.seed,
                                   "bias": {replicas[i].name: noise.bias(i) for i in range(len(replicas))}}
        return RunRecord(sch.name, self.cluster.source, replicas, seqs, moves, extra=extra)


def simulate(cluster: ClusterSpec, scheduler: Scheduler, requests: list[Request],
             noise: CostNoise | None = None, deadline: float | None = None) -> RunRecord:
    """Run ``scheduler`` on ``requests``; ``noise``: the engines' deviation from the cost model
    (``CostNoise``; None: exact); ``deadline``: a ``time.perf_counter()`` value past which the run
    stops with ``DeadlinePassed`` (None: never)."""
    return Simulator(cluster, scheduler, noise, deadline).run(requests)
