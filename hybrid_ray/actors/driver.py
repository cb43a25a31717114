"""The Ray driver of ``hybrid-ray run``: plan, place actors, dispatch, collect, fail over, write results.

One policy code path: each ``ReplicaActor`` runs ``scheduler.policy_factory(state)`` on its own
``ReplicaState``; the ``ControllerActor`` runs ``scheduler.router`` and ``scheduler.controller``;
the driver only moves requests and results around.

Loop (real time): send each arrival to the controller when its scaled arrival time comes (the
first batch before the clock starts), long-poll every replica for completions (an answer is also
its heartbeat), append completions to the ``--output`` JSONL as they come, print progress. A
replica whose poll fails with ``RayActorError`` or stays unanswered past the heartbeat timeout is
declared failed (and killed, so it cannot finish anything late): every request booked there that
has not finished is recomputed from its prompt on the survivors. If none survive, the run stops
with the unfinished ids, also written to a file, and ``--resume`` picks up from the output.

The controller actor is watched the same way: one ``ping`` in flight (its heartbeat). If a
controller call or the ping fails with ``RayActorError``, or the ping stays unanswered past the
heartbeat timeout, the driver kills it and starts a new one of the next generation
(``_replace_controller``, at most ``MAX_CONTROLLER_RESTARTS`` times): every live replica is pointed
at it (``set_controller``, which fences off the old generation's adds) and reports the ids it
holds; the new controller gets those books, and whatever the driver had sent for routing that no
replica holds and that has not finished (held by the old controller, or in flight from it) is
requeued. Completions are de-duplicated by id, so every request is still recorded exactly once.
Beyond the restarts, the run stops with ``ControllerLostError`` and the resume hint.

Output lengths: the driver owns the scheduler's length predictor. Each completion tells it a true
length (``observe``); when that moves its predictions (``version``), the new table goes to the
controller, which has every replica re-predict its queued work and rebalances, as ``simulate`` does.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..config import ClusterSpec
from ..engines import engine_spec
from ..errors import ControllerLostError, HybridRayError, ReplicasLostError, RuntimeSetupError
from ..progress import Progress
from ..replica import FINISHED, LoadReport, ReplicaState, Sequence
from ..results import PLAIN, CompletionRecord, ResultsWriter
from ..runspec import RunOptions, RunResult, engine_label   # not ..runtime: it imports this module
from ..workload import Request
from .session import (actor_options, check_local_capacity, check_resources, connect_ray, describe_resources,
                      group_resources, local_cpus, shutdown_ray, will_start_local)

log = logging.getLogger(__name__)

UNFINISHED_DEFAULT = "hybrid-ray-unfinished.txt"
MAX_CONTROLLER_RESTARTS = 3        # controller replacements per run before it stops with the resume hint


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    import numpy as np

    return float(np.percentile(np.asarray(values), 99))


def _unfinished_path(output: str | None) -> str:
    return f"{output}.unfinished.txt" if output else UNFINISHED_DEFAULT


class Driver:
    """One run on Ray. ``hook(driver)`` (tests, tools) is called after each batch of completions.

    Public while running: ``names``, ``handles`` (replica actor handles), ``live`` (indices),
    ``done`` (requests finished), ``total``.
    """

    def __init__(self, opts: RunOptions, cluster: ClusterSpec, requests: list[Request], scheduler=None,
                 hook: Callable[["Driver"], None] | None = None, skipped: int = 0):
        self.opts = opts
        self.cluster = cluster
        self.requests = sorted(requests, key=lambda q: q.arrival_s)
        self.by_id = {q.id: q for q in self.requests}
        self.scheduler = scheduler
        self.hook = hook
        self.skipped = skipped
        self.specs = cluster.replicas()
        self.names = [s.name for s in self.specs]
        self.total = len(self.requests)
        self.handles: list = []
        self.live: set[int] = set()
        self.controller = None
        self.planner = None
        self.plan = None
        self.completed: dict[str, CompletionRecord] = {}
        self.failed: list[str] = []
        self.failure_reasons: dict[str, str] = {}
        self.requeued = 0
        self.duplicates = 0
        self.tokens = 0
        self.last_finish = 0.0
        self.reports: list[LoadReport | None] = [None] * len(self.specs)
        self.behind = [0.0] * len(self.specs)
        self.msgs: Counter = Counter()
        self.writer: ResultsWriter | None = None
        self.unfinished_path = _unfinished_path(opts.output)
        self.t_first = self.requests[0].arrival_s if self.requests else 0.0
        self.epoch = 0.0
        self.replica_stats: list = []
        # --history: read now, so a bad file fails before Ray starts
        self.history = None
        if opts.history:
            from ..history import load_history
            self.history = load_history(opts.history)
        self.pred_version = 0                  # predictor version last pushed to the replicas
        self.pred_refs: list = []              # set_predictions calls in flight
        self.route_refs: list = []             # route calls in flight
        self.sent = 0                          # self.requests[:sent] were handed to a controller
        self.controller_pid: int | None = None
        self.controller_gen = 0
        self.controller_failures: list[str] = []
        self.max_controller_restarts = MAX_CONTROLLER_RESTARTS
        self.watch_from = 0.0                  # no heartbeat window starts before: the driver was busy
        self.ping_ref = None                   # the controller's heartbeat in flight
        self.ping_sent = 0.0
        self.next_ping = 0.0
        self.ctrl_counts: tuple[int, dict] = (0, {})   # the live controller's moves, messages (last ping)
        self.ctrl_carry: Counter = Counter()           # ... of the controllers lost before it
        self.ctrl_carry_moves = 0

    @property
    def done(self) -> int:
        return len(self.completed)

    # -- setup --------------------------------------------------------------------------------------
    def _make_scheduler(self):
        import ray

        from . import remote_class
        from .planner import PlannerActor
        from ..policies import build_scheduler, initial_batch, needs_plan

        if self.scheduler is not None:
            return self.scheduler
        from ..policies import plan_bands, plan_dispatch
        from ..policies.predict import make_predictor

        plan = None
        seed = self.opts.seed or 0
        # one predictor: the plan is made with it, and the scheduler keeps learning with it
        predictor = make_predictor(self.opts.lengths, self.requests, seed, history=self.history)
        if needs_plan(self.opts.policy):
            import numpy as np

            batch = initial_batch(self.requests)
            predicted = np.array([predictor.predict(q) for q in batch], dtype=np.float64)
            self.planner = remote_class(PlannerActor).options(
                name=f"hybrid-ray-{self.run_id}-planner", num_cpus=0, max_restarts=0).remote()
            ref = self.planner.plan.remote(self.cluster, batch, predicted_output=predicted,
                                           method=self.opts.plan_method, time_limit_s=self.opts.plan_time_limit_s,
                                           deterministic_time=self.opts.plan_deterministic_time,
                                           workers=self.opts.plan_workers, seed=seed, bands=plan_bands(self.opts.policy, predictor),
                                           dispatch=plan_dispatch(self.opts.policy, predictor, self.cluster))
            self.msgs["plan"] += 1
            ready, _ = ray.wait([ref], timeout=self._plan_wait_s())
            if not ready:
                raise RuntimeSetupError("the planner actor did not answer in time (is the cluster out of CPUs?)")
            plan = ray.get(ref)
            self.plan = plan
            ray.kill(self.planner)
            self.planner = None
        return build_scheduler(self.opts.policy, self.cluster, self.requests, plan=plan, lengths=self.opts.lengths,
                               seed=seed, predictor=predictor)

    def _plan_wait_s(self) -> float:
        """How long to wait for the planner actor: its wall limit, or (a deterministic budget alone)
        a generous multiple of the budget's units, about a second each on a free core; plus start-up."""
        import math

        from ..planner.binpack import deterministic_budget

        limit = self.opts.plan_time_limit_s
        if not math.isfinite(limit):
            limit = 10.0 * deterministic_budget(limit, self.opts.plan_deterministic_time) + 30.0
        return limit + self.opts.startup_timeout_s

    def _create_actors(self, per_replica: dict[str, dict[str, float]]) -> None:
        import ray

        from . import remote_class
        from .replica import ReplicaActor

        sch = self.scheduler
        replica_cls = remote_class(ReplicaActor)
        factory = ray.put(sch.policy_factory)
        ts = self.cluster.time_scale
        for spec in self.specs:
            opts = actor_options(per_replica[spec.group.name])
            h = replica_cls.options(name=f"hybrid-ray-{self.run_id}-{spec.name}", max_restarts=0,
                                    max_concurrency=1000, **opts).remote(
                spec, factory, ts, self.opts.report_interval_s, report_finished=sch.dispatcher is not None,
                engine_spec=engine_spec(self.opts.engine, self.opts.model, self.opts.device,
                                        cpus=per_replica[spec.group.name].get("CPU")))
            self.handles.append(h)
        refs = {h.ready.remote(): i for i, h in enumerate(self.handles)}
        self.msgs["ready"] += len(refs)
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.opts.startup_timeout_s)
        if pending:
            names = [self.names[refs[r]] for r in pending]
            groups = sorted({self.specs[refs[r]].group.name for r in pending})
            raise RuntimeSetupError(
                f"replica actor(s) {', '.join(names[:8])}{' ...' if len(names) > 8 else ''} of group(s) "
                f"{', '.join(groups)} not placed within {self.opts.startup_timeout_s:.0f} s; they ask for "
                f"{per_replica[groups[0]]}; the cluster has {describe_resources(ray.cluster_resources())} "
                f"({describe_resources(ray.available_resources())} free)")
        ray.get(ready)                     # surfaces constructor errors
        self.live = set(range(len(self.handles)))
        self.controller = self._new_controller(0)

    def _new_controller(self, gen: int):
        """A ControllerActor of generation ``gen`` with fresh copies of the scheduler's router,
        controller and dispatcher; returns its handle once it answers."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        from . import remote_class
        from .controller import ControllerActor

        sch = self.scheduler
        suffix = f"-{gen}" if gen else ""
        h = remote_class(ControllerActor).options(
            name=f"hybrid-ray-{self.run_id}-controller{suffix}", num_cpus=0, max_restarts=0, max_concurrency=1000,
        ).remote(self.cluster, sch.router, sch.controller, self.handles, self.cluster.time_scale,
                 dispatcher=sch.dispatcher, generation=gen)
        self.msgs["ready"] += 1
        try:
            self.controller_pid = ray.get(h.ready.remote(), timeout=self.opts.startup_timeout_s)
        except (GetTimeoutError, RayActorError) as e:
            if not gen:
                raise RuntimeSetupError(f"the controller actor did not start within "
                                        f"{self.opts.startup_timeout_s:.0f} s ({type(e).__name__})") from None
            self.controller_failures.append(f"replacement did not start ({type(e).__name__})")
            raise self._controller_lost() from None
        self.ctrl_counts = (0, {})
        self.ping_ref, self.next_ping = None, 0.0
        return h

    # -- run ----------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        import ray

        t_wall0 = time.perf_counter()
        self.run_id = uuid.uuid4().hex[:8]
        per_replica = group_resources(self.cluster, self.opts.cpus_per_replica)
        if will_start_local(self.opts.address):      # fail before starting a Ray the machine cannot hold
            check_local_capacity(self.cluster, per_replica, os.cpu_count() or 1,
                                 real_engine=self.opts.engine not in (None, "emulated"))
        owns = connect_ray(self.opts.address, local_cpus(self.cluster, per_replica), self.opts.connect_timeout_s)
        progress = Progress(self.total, self.opts.progress)
        try:
            check_resources(self.cluster.groups, per_replica, ray.cluster_resources(),
                            [n["Resources"] for n in ray.nodes() if n.get("Alive")], source=self.cluster.source)
            self.scheduler = self._make_scheduler()
            if self.opts.output:
                self.writer = (self.opts.output_format or PLAIN).writer(self.opts.output, append=True)
            self._create_actors(per_replica)
            run_wall = self._loop(progress)
            states, cstats = self._collect()
        finally:
            progress.close()
            if self.writer is not None:
                self.writer.close()
            self._kill_all()
            if owns:
                shutdown_ray()
        return self._result(states, cstats, time.perf_counter() - t_wall0, run_wall)

    def _loop(self, progress: Progress) -> float:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        from .clock import ModelClock

        sch, reqs, opts = self.scheduler, self.requests, self.opts
        n = len(reqs)
        k = 0
        while k < n and reqs[k].arrival_s == self.t_first:
            k += 1
        if k:
            self.sent = k
            self._ctrl_get(self.controller.route.remote([sch.make_sequence(q) for q in reqs[:k]]),
                           "route the first batch")
            self.msgs["route"] += 1
        epoch = time.time() + 0.05                 # the start reaches every actor before the clock runs
        clock = ModelClock(epoch, self.t_first, self.cluster.time_scale)
        ctrl = self.controller
        starts = [h.start.remote(epoch, self.t_first, ctrl) for h in self.handles]
        self.msgs["start"] += len(starts) + 1
        self.epoch = epoch                         # from now on a replacement controller starts on this clock
        self._ctrl_get(ctrl.start.remote(epoch, self.t_first), "start the controller")
        self._await_all(starts, "start the actors")
        poll_ref: dict[int, Any] = {}
        poll_sent: dict[int, float] = {}
        next_poll = [0.0] * len(self.handles)
        tick = 0.05
        next_dispatch = 0.0
        lead = opts.dispatch_lead_s
        while self.done < self.total:
            now = time.time()
            if k < n and now >= next_dispatch:
                j = k
                while j < n and clock.real_at(reqs[j].arrival_s) <= now + lead:
                    j += 1
                if j > k:
                    self.sent = j
                    self.route_refs.append(self.controller.route.remote([sch.make_sequence(q) for q in reqs[k:j]]))
                    self.msgs["route"] += 1
                    k = j
                    next_dispatch = now + opts.dispatch_gap_s
            for i in sorted(self.live):
                if i not in poll_ref and now >= next_poll[i]:
                    poll_ref[i] = self.handles[i].poll.remote(opts.poll_wait_s)
                    poll_sent[i] = now
                    self.msgs["poll"] += 1
            self._check_controller(now)
            refs = list(poll_ref.values()) + self.route_refs + self.pred_refs
            if self.ping_ref is not None:
                refs.append(self.ping_ref)
            timeout = tick
            if k < n:
                due = max(next_dispatch, clock.real_at(reqs[k].arrival_s) - lead)
                timeout = min(timeout, max(0.0, due - time.time()))
            if refs:
                ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
                if ready:
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            else:
                time.sleep(timeout)
                ready = []
            ready_set = set(ready)
            for r in [r for r in self.route_refs if r in ready_set]:
                if r in self.route_refs:               # a controller replacement drops the rest
                    self.route_refs.remove(r)
                    self._ctrl_get(r, "route requests")
            for r in [r for r in self.pred_refs if r in ready_set]:
                if r in self.pred_refs:
                    self.pred_refs.remove(r)
                    if self._ctrl_get(r, "push predictions")[0]:
                        self._push_predictions()       # a version that moved meanwhile
            now = time.time()
            for i, ref in list(poll_ref.items()):
                if ref in ready_set:
                    del poll_ref[i]
                    try:
                        res = ray.get(ref)
                    except RayActorError as e:
                        self._fail(i, f"actor died ({type(e).__name__})")
                        continue
                    self.reports[i] = res.report
                    self.behind[i] = res.behind_s
                    next_poll[i] = now + opts.min_poll_gap_s
                    if res.completions:
                        self._on_completions(res.completions)
                elif i not in self.live:
                    del poll_ref[i]                    # failed meanwhile (seen by a controller replacement)
                elif now - max(poll_sent[i], self.watch_from) > opts.poll_wait_s + opts.heartbeat_timeout_s:
                    if ray.wait([ref], timeout=0)[0]:
                        continue                       # answered while this loop was busy: read next round
                    del poll_ref[i]
                    self._fail(i, f"no answer for {opts.heartbeat_timeout_s:.0f} s")
            progress.update(self.done, self.tokens, max(self.last_finish - self.t_first, 0.0), now - self.epoch,
                            self._queues())
        progress.update(self.done, self.tokens, max(self.last_finish - self.t_first, 0.0), time.time() - self.epoch,
                        self._queues(), force=True)
        for r in self.route_refs:
            try:
                ray.get(r, timeout=self.opts.heartbeat_timeout_s)
            except (GetTimeoutError, RayActorError):
                pass
        return time.time() - self.epoch

    def _on_completions(self, recs: list[CompletionRecord]) -> None:
        new = []
        for rec in recs:
            if rec.id in self.completed:
                self.duplicates += 1           # a late answer from a replica declared failed
                continue
            if rec.id not in self.by_id:
                continue
            self.completed[rec.id] = rec
            self.tokens += rec.output_tokens
            self.last_finish = max(self.last_finish, rec.finish_s)
            new.append(rec)
            self.scheduler.predictor.observe(self.by_id[rec.id], rec.output_tokens)   # the true length
        self._push_predictions()
        if self.writer is not None and new:
            self.writer.write(new)
        if self.hook is not None and new:
            self.hook(self)

    def _push_predictions(self) -> None:
        """If the predictor's version moved, send its table to the controller (which re-predicts the
        replicas' queues and rebalances); one call in flight at most, the newest version wins."""
        pred = self.scheduler.predictor
        if pred.version == self.pred_version or self.pred_refs or self.controller is None:
            return
        self.pred_version = pred.version
        self.pred_refs.append(self.controller.set_predictions.remote(pred.snapshot(), self.scheduler.rekey,
                                                                     pred.version))
        self.msgs["set_predictions"] += 1

    def _fail(self, i: int, reason: str) -> None:
        """Declare replica i failed; recompute its unfinished requests on the survivors."""
        if i not in self.live:
            return
        self._mark_failed(i, reason)
        if not self.live:
            raise self._all_lost()
        ok, ids = self._ctrl_get(self.controller.replica_failed.remote(i), "book the failed replica")
        self.msgs["replica_failed"] += 1
        if not ok:
            return                       # the controller was replaced: its rebuild requeued replica i's work
        lost = [rid for rid in ids if rid not in self.completed]
        if lost:
            self._requeue(lost)

    def _mark_failed(self, i: int, reason: str) -> None:
        import ray

        self.live.discard(i)
        name = self.names[i]
        self.failed.append(name)
        self.failure_reasons[name] = reason
        log.warning("replica %s failed: %s", name, reason)
        try:
            ray.kill(self.handles[i], no_restart=True)   # fence: it must not finish anything late
        except Exception:                                 # noqa: BLE001 -- already gone
            pass

    def _requeue(self, ids: list[str]) -> None:
        """Recompute requests from their prompts on the live replicas (through the controller's router)."""
        seqs = [self.scheduler.make_sequence(self.by_id[rid]) for rid in ids]
        self.msgs["requeue"] += 1
        self.requeued += len(ids)
        self._ctrl_get(self.controller.requeue.remote(seqs), "requeue requests")

    # -- the controller: heartbeat, calls, replacement ------------------------------------------------
    def _check_controller(self, now: float) -> bool:
        """The controller's heartbeat: one ``ping`` in flight. Returns True if it had to be replaced
        (the ping failed: died; or stayed unanswered past the heartbeat timeout: hung)."""
        import ray
        from ray.exceptions import RayActorError

        opts = self.opts
        if self.ping_ref is None:
            if now >= self.next_ping:
                self.ping_ref, self.ping_sent = self.controller.ping.remote(), now
                self.msgs["ping"] += 1
            return False
        ready, _ = ray.wait([self.ping_ref], timeout=0)
        if ready:
            ref, self.ping_ref = self.ping_ref, None
            self.next_ping = now + opts.poll_wait_s
            try:
                self.ctrl_counts = ray.get(ref)
            except RayActorError as e:
                self._replace_controller(f"actor died ({type(e).__name__})")
                return True
            return False
        if now - self.ping_sent > opts.poll_wait_s + opts.heartbeat_timeout_s:
            self._replace_controller(f"no answer for {opts.heartbeat_timeout_s:g} s")
            return True
        return False

    def _ctrl_get(self, ref, what: str) -> tuple[bool, Any]:
        """Wait for a controller call while watching the controller's heartbeat: (True, its value), or
        (False, None) if the controller died or hung meanwhile and was replaced (the replacement
        re-placed whatever the call was about). A call that found every replica dead loses the run."""
        t0 = time.time()
        try:
            return self._wait_ctrl(ref, what)
        finally:
            if time.time() - t0 > 1.0:          # a long wait watched no replica: restart their windows
                self.watch_from = max(self.watch_from, time.time())

    def _wait_ctrl(self, ref, what: str) -> tuple[bool, Any]:
        import ray
        from ray.exceptions import RayActorError

        from .controller import NoLiveReplicaError

        while True:
            ready, _ = ray.wait([ref], timeout=0.05)
            if ready:
                try:
                    return True, ray.get(ref)
                except NoLiveReplicaError:
                    for i in sorted(self.live):
                        self._mark_failed(i, "unreachable from the controller")
                    raise self._all_lost() from None
                except RayActorError as e:
                    self._replace_controller(f"actor died ({type(e).__name__}) trying to {what}")
                    return False, None
            if self._check_controller(time.time()):
                return False, None

    def _replace_controller(self, reason: str) -> None:
        """Kill a dead or hung controller and carry on with a new one (docstring of this module).

        Starting the new actor can take seconds on a loaded host; the driver watches no replica
        meanwhile, so their heartbeat windows restart when it is done (``watch_from``)."""
        try:
            self._start_new_controller(reason)
        finally:
            self.watch_from = time.time()

    def _start_new_controller(self, reason: str) -> None:
        import ray
        from ray.exceptions import RayActorError

        self.controller_failures.append(reason)
        log.warning("controller actor failed (%s); starting a new one (restart %d of at most %d)", reason,
                    len(self.controller_failures), self.max_controller_restarts)
        moves, msgs = self.ctrl_counts             # its last heartbeat's counts
        self.ctrl_carry_moves += moves
        self.ctrl_carry.update(msgs)
        try:
            ray.kill(self.controller, no_restart=True)
        except Exception:                           # noqa: BLE001 -- already gone
            pass
        self.route_refs.clear()                     # answers from the old controller are moot
        self.pred_refs.clear()
        self.ping_ref = None
        if len(self.controller_failures) > self.max_controller_restarts:
            raise self._controller_lost()
        self.controller_gen += 1
        gen = self.controller_gen
        self.controller = self._new_controller(gen)
        # every live replica obeys the new generation from now on and says what it holds
        live = sorted(self.live)
        refs = {i: self.handles[i].set_controller.remote(self.controller, gen) for i in live}
        self.msgs["set_controller"] += len(refs)
        if refs:
            ray.wait(list(refs.values()), num_returns=len(refs),
                     timeout=self.opts.poll_wait_s + self.opts.heartbeat_timeout_s)
        held: dict[int, tuple[LoadReport, list[str]]] = {}
        for i, ref in refs.items():
            try:
                held[i] = ray.get(ref, timeout=0)
            except RayActorError as e:
                self._mark_failed(i, f"actor died ({type(e).__name__})")
            except Exception:                       # noqa: BLE001 -- GetTimeoutError: hung
                self._mark_failed(i, f"no answer for {self.opts.heartbeat_timeout_s:g} s")
        if not self.live:
            raise self._all_lost()
        everywhere = {rid for _, ids in held.values() for rid in ids}
        books = {i: (rep, [rid for rid in ids if rid not in self.completed]) for i, (rep, ids) in held.items()}
        dead = [i for i in range(len(self.handles)) if i not in self.live]
        ok, _ = self._ctrl_get(self.controller.rebuild.remote(books, dead, self.epoch or None, self.t_first,
                                                               self.sent),
                               "rebuild the controller")
        self.msgs["rebuild"] += 1
        if not ok:
            return                                  # replaced again meanwhile: that replacement did the rest
        lost = [q.id for q in self.requests[:self.sent] if q.id not in self.completed and q.id not in everywhere]
        if lost:
            self._requeue(lost)
        self.pred_version = 0                       # the new controller gets the newest length predictions
        self._push_predictions()

    def _controller_lost(self) -> ControllerLostError:
        path = self._write_unfinished()
        reasons = "; ".join(self.controller_failures)
        n = len(self.controller_failures)
        return ControllerLostError(
            f"the controller actor failed {n} {'time' if n == 1 else 'times'} ({reasons}), more than the "
            f"{self.max_controller_restarts} restarts allowed; {self.total - self.done} of {self.total} requests "
            f"unfinished, their ids are in {path}; {self._resume_hint()}")

    def _resume_hint(self) -> str:
        out = self.opts.output
        return (f"the {self.done} finished requests are in {out}: rerun with --resume {out}" if out
                else "rerun with --output FILE to keep finished requests across failures")

    def _write_unfinished(self) -> str:
        unfinished = [q.id for q in self.requests if q.id not in self.completed]
        path = self.unfinished_path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(f"{rid}\n" for rid in unfinished))
        return path

    def _all_lost(self) -> ReplicasLostError:
        unfinished = [q.id for q in self.requests if q.id not in self.completed]
        path = self._write_unfinished()
        shown = ", ".join(unfinished[:20]) + (f" ... (+{len(unfinished) - 20} more)" if len(unfinished) > 20 else "")
        reasons = "; ".join(f"{n}: {self.failure_reasons[n]}" for n in self.failed)
        return ReplicasLostError(
            f"all {len(self.handles)} replicas failed ({reasons}); {len(unfinished)} of {self.total} requests "
            f"unfinished: {shown}; their ids are in {path}; {self._resume_hint()}", unfinished, path)

    def _queues(self) -> list[str]:
        out = []
        for i, r in enumerate(self.reports):
            if i not in self.live:
                out.append("x")
            else:
                out.append(str(r.outstanding) if r is not None else "-")
        return out

    # -- the end ------------------------------------------------------------------------------------
    def _collect(self):
        import ray

        srefs = [self.handles[i].get_stats.remote() for i in sorted(self.live)]
        refs = {i: self.handles[i].finish.remote() for i in sorted(self.live)}
        self.msgs["finish"] += len(refs) + len(srefs)
        try:
            self.replica_stats = ray.get(srefs, timeout=self.opts.startup_timeout_s)
        except Exception:                             # noqa: BLE001 -- statistics only
            self.replica_stats = []
        states: list[ReplicaState] = []
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.opts.startup_timeout_s)
        for i, spec in enumerate(self.specs):
            st = None
            if i in refs:
                try:
                    st = ray.get(refs[i], timeout=1.0)
                except Exception:                     # noqa: BLE001 -- died at the very end: no timeline
                    st = None
            states.append(st if st is not None else ReplicaState(spec))
        cstats = self._controller_stats()
        return states, cstats

    def _controller_stats(self):
        """The controller's statistics plus the moves and messages of those it replaced. Every request
        has finished by now: a controller that died or hangs at this point costs only its statistics."""
        import ray

        from .controller import ControllerStats

        self.msgs["stop"] += 1
        try:
            cstats = ray.get(self.controller.stop.remote(),
                             timeout=self.opts.poll_wait_s + self.opts.heartbeat_timeout_s)
        except Exception as e:                        # noqa: BLE001 -- died or hung at the very end
            log.warning("controller actor failed after the last request finished (%s): its statistics are lost",
                        type(e).__name__)
            moves, msgs = self.ctrl_counts
            cstats = ControllerStats(messages=dict(msgs), moves=moves)
        cstats.moves += self.ctrl_carry_moves
        cstats.messages = dict(Counter(cstats.messages) + self.ctrl_carry)
        return cstats

    def _kill_all(self) -> None:
        import ray

        for h in [*self.handles, self.controller, self.planner]:
            if h is not None:
                try:
                    ray.kill(h, no_restart=True)
                except Exception:                     # noqa: BLE001 -- already gone
                    pass

    def _result(self, states, cstats, wall: float, run_wall: float) -> RunResult:
        from ..metrics import summarize
        from ..planner.bounds import lower_bound
        from ..simulator import RunRecord

        seqs = []
        first = self.scheduler.first_predictions
        started = {s.id: s.predicted_output for st in states for s in st.finished}   # what each started with
        for rec in self.completed.values():
            req = self.by_id[rec.id]
            seqs.append(Sequence(req, started.get(rec.id, first.get(rec.id, -1)), status=FINISHED,
                                 generated=rec.output_tokens, first_token_s=rec.first_token_s, finish_s=rec.finish_s,
                                 preemptions=rec.preemptions, replica=rec.replica,
                                 predicted_first=first.get(rec.id, -1)))
        record = RunRecord(self.scheduler.name, self.cluster.source, states, seqs, cstats.moves,
                           extra={"failed_replicas": list(self.failed), "predictor": self.scheduler.predictor.name,
                                  "prediction_versions": self.scheduler.predictor.version})
        summary = summarize(record, lower_bound(self.cluster, self.requests).value_s)
        messages = Counter(self.msgs)
        for key, count in cstats.messages.items():
            if key in ("report", "add", "take_back", "repredict"):   # the rest were counted where they were sent
                messages[key] += count
        total_msgs = sum(messages.values())
        late = sum(st.late for st in self.replica_stats)
        late_sum = sum(st.late_sum_s for st in self.replica_stats)
        return RunResult(
            summary=summary, record=record, wall_s=wall, run_wall_s=run_wall, time_scale=self.cluster.time_scale,
            failed_replicas=list(self.failed), requeued=self.requeued,
            controller_decision_p99_s=_p99(cstats.route_latency_s + cstats.rebalance_latency_s),
            messages=dict(messages), messages_per_request=total_msgs / max(self.total, 1),
            max_lag_s=max(self.behind, default=0.0), late_adds=late, late_mean_s=late_sum / late if late else 0.0,
            late_max_s=max((st.late_max_s for st in self.replica_stats), default=0.0), skipped=self.skipped, duplicates_ignored=self.duplicates,
            plan=self.plan, output=self.opts.output, engine=engine_label(self.opts),
            controller_failures=list(self.controller_failures))

    # -- helpers ------------------------------------------------------------------------------------
    def _await(self, ref, what: str):
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            return ray.get(ref, timeout=self.opts.startup_timeout_s)
        except GetTimeoutError:
            raise HybridRayError(f"timed out after {self.opts.startup_timeout_s:.0f} s trying to {what}") from None

    def _await_all(self, refs: list, what: str) -> list:
        return [self._await(r, what) for r in refs]
