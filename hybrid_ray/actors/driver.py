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

Failed engine steps: a replica whose engine raised in a step stays up and hands back the lines its
engine held (``PollResult.failures``, ``actors/replica.py``); the driver requeues them from their
prompts as it requeues a lost replica's (``_requeue``). A line that was in ``MAX_LINE_FAILURES``
failing steps is not run again: it gets an error line (code ``server_error``) and counts as settled.

Planning overlaps the engines' start (planned policies): the driver starts the ``PlannerActor`` and
does not wait for it; the replicas and the controller start on the initial plan (``planner.initial``,
LPT, made here in well under a second) and the first iterations run on it. When the full plan
arrives (the loop waits on it with the rest), ``_switch_plan`` gives the replicas its iteration
policy and the controller its router, controller and dispatcher (``apply_plan``), which re-place
every request that has not started; started ones stay. No timeout: a planner that raises or dies
costs one warning line and the run goes on with the initial plan (``RunOptions.wait_for_plan``:
start only once the full plan is in).

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
from ..engines.factory import engine_spec
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
MAX_LINE_FAILURES = 2              # failing engine steps a request may be in; then it gets an error line


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    import numpy as np

    return float(np.percentile(np.asarray(values), 99))


def _short_error(e: BaseException) -> str:
    """One line for a planner's failure: the remote exception's type and first line (no traceback)."""
    cause = getattr(e, "cause", None)          # RayTaskError: what the actor raised
    if isinstance(cause, BaseException):
        e = cause
    from ray.exceptions import RayActorError

    if isinstance(e, RayActorError):
        return f"its actor died ({type(e).__name__})"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


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
        self.errored: dict[str, str] = {}      # requests the engine failed on MAX_LINE_FAILURES times: why
        self.line_failures: Counter = Counter()   # failing engine steps each request was in
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
        # planning overlaps the engines' start (planned policies): the run starts on the initial plan
        self.t_start = 0.0                     # the driver's start (time.time()): what the *_s below count from
        self.initial_plan = None               # planner.initial: LPT, made in the driver
        self.plan_ref = None                   # the full plan, from the PlannerActor, while awaited
        self.plan_wall_s: float | None = None  # when it arrived (None: it did not, before the run ended)
        self.planner_error: str | None = None  # why the planner gave none (the run kept the initial plan)
        self.plan_moved = 0                    # requests the full plan moved to another replica
        self.plan_kept: dict[str, str] = {}    # request id -> replica: what it left alone (started, finished)
        self.engines_ready_s = 0.0             # every replica constructed (a real engine: its model loaded)

    @property
    def done(self) -> int:
        """Requests settled: completed, or given an error line."""
        return len(self.completed) + len(self.errored)

    def _settled(self, rid: str) -> bool:
        return rid in self.completed or rid in self.errored

    # -- setup --------------------------------------------------------------------------------------
    planner_class: type | None = None          # the planner actor's class (None: actors.planner.PlannerActor)

    def _make_scheduler(self):
        from ..planning import build_scheduler
        from ..policies.predict import make_predictor
        from ..schedulers import needs_plan

        if self.scheduler is not None:
            return self.scheduler
        plan = None
        seed = self.opts.seed or 0
        # one predictor: the plans are made with it, and the scheduler keeps learning with it
        predictor = make_predictor(self.opts.lengths, self.requests, seed, history=self.history)
        if needs_plan(self.opts.policy):
            plan = self._start_planning(predictor, seed)
        return build_scheduler(self.opts.policy, self.cluster, self.requests, plan=plan, lengths=self.opts.lengths,
                               seed=seed, predictor=predictor)

    def _start_planning(self, predictor, seed: int):
        """Start the full planner in its actor, without waiting for it (``_check_plan`` takes its answer
        whenever it comes), and return the initial plan the run starts on meanwhile: LPT on the
        estimated work, longest first (``planner.initial``, well under a second)."""
        import numpy as np

        from . import remote_class
        from ..planner.initial import initial_plan
        from ..schedulers import initial_batch, plan_bands, plan_dispatch

        batch = initial_batch(self.requests)
        predicted = np.array([predictor.predict(q) for q in batch], dtype=np.float64)
        dispatch = plan_dispatch(self.opts.policy, predictor, self.cluster)
        cls = self.planner_class
        if cls is None:
            from .planner import PlannerActor as cls
        self.planner = remote_class(cls).options(
            name=f"hybrid-ray-{self.run_id}-planner", num_cpus=0, max_restarts=0).remote()
        self.plan_ref = self.planner.plan.remote(self.cluster, batch, predicted_output=predicted,
                                                 method=self.opts.plan_method, time_limit_s=self.opts.plan_time_limit_s,
                                                 deterministic_time=self.opts.plan_deterministic_time,
                                                 plan_share=self.opts.plan_share,
                                                 workers=self.opts.plan_workers, seed=seed,
                                                 bands=plan_bands(self.opts.policy, predictor), dispatch=dispatch)
        self.msgs["plan"] += 1
        plan = initial_plan(self.cluster, batch, predicted)
        # where the dispatch is decided without the planner's simulation (the YAML's, or the rule for
        # learned lengths), the initial plan's is the full plan's: no switch of dispatch mid-run
        given = self.cluster.policy.get("hybrid", {}).get("dispatch", "auto")
        if (dispatch if given == "auto" else given) == "bounded":
            plan.info["dispatch"] = "bounded"
        self.plan = self.initial_plan = plan
        return plan

    def _check_plan(self, wait: bool = False) -> None:
        """If the full plan is in (with ``wait``: once it is, however long the planner takes), switch
        to it (``_switch_plan``). A planner that raised or died leaves the run on the initial plan,
        with one warning line. Never fails the run."""
        import ray

        ref = self.plan_ref
        if ref is None:
            return
        if wait:
            while not ray.wait([ref], timeout=1.0)[0]:
                pass
        elif not ray.wait([ref], timeout=0)[0]:
            return
        self.plan_ref = None
        try:
            plan = ray.get(ref)
        except Exception as e:                        # noqa: BLE001 -- RayActorError, RayTaskError: keep going
            self._planner_failed(_short_error(e))
            return
        self.plan_wall_s = time.time() - self.t_start
        self._stop_planner()
        t0 = time.time()
        try:
            self._switch_plan(plan)
        finally:
            if time.time() - t0 > 1.0:                # a long switch watched no replica: restart their windows
                self.watch_from = max(self.watch_from, time.time())

    def _planner_failed(self, reason: str) -> None:
        self.planner_error = reason
        log.warning("the planner failed (%s); the run goes on with the initial plan (LPT)", reason)
        self._stop_planner()

    def _stop_planner(self) -> None:
        """Kill the planner actor (done, failed, or no longer needed at the run's end); an answer still
        pending is collected so that Ray reports no unhandled error for it."""
        import ray

        planner, ref = self.planner, self.plan_ref
        self.planner = self.plan_ref = None
        if planner is not None:
            try:
                ray.kill(planner, no_restart=True)
            except Exception:                         # noqa: BLE001 -- already gone
                pass
        if ref is not None:
            try:
                ray.get(ref, timeout=2.0)
            except Exception:                         # noqa: BLE001 -- the kill's own error
                pass

    def _switch_plan(self, plan) -> None:
        """Go on with the full plan: its scheduler (same predictor), its iteration policy on every live
        replica, and, through the controller (``apply_plan``), its router, controller and dispatcher,
        with every request that has not started re-assigned and re-ordered by it. Started requests
        stay where they are."""
        import ray

        from ..planning import build_scheduler

        old = self.scheduler
        try:
            new = build_scheduler(self.opts.policy, self.cluster, self.requests, plan=plan, lengths=self.opts.lengths,
                                  seed=self.opts.seed or 0, predictor=old.predictor)
        except Exception as e:                        # noqa: BLE001 -- an unusable plan: keep the initial one
            self._planner_failed(f"its plan cannot be used: {_short_error(e)}")
            return
        new.first_predictions = old.first_predictions
        self.scheduler, self.plan = new, plan
        live = sorted(self.live)
        factory = ray.put(new.policy_factory)
        refs = [self.handles[i].set_policy.remote(factory, new.dispatcher is not None) for i in live]
        self.msgs["set_policy"] += len(refs)
        if refs:                                      # a dead or hung replica: its poll finds out
            ray.wait(refs, num_returns=len(refs), timeout=self.opts.poll_wait_s + self.opts.heartbeat_timeout_s)
        move = self.sent > 0                          # before the first route there is nothing to move
        ok, applied = self._ctrl_get(self.controller.apply_plan.remote(new.router, new.controller, new.dispatcher,
                                                                       new.sort_key, move), "apply the full plan")
        self.msgs["apply_plan"] += 1
        if ok:
            self.plan_moved = applied.moved
            self.plan_kept = {rid: self.names[i] for rid, i in applied.kept.items()}
            log.info("full plan applied at %.2f s: %d requests re-placed, %d moved, %d left where they started",
                     time.time() - self.t_start, applied.taken, applied.moved, len(applied.kept))

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
        self.controller = self._new_controller(0)     # starts while the replicas construct their engines
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
        self.engines_ready_s = time.time() - self.t_start
        self.live = set(range(len(self.handles)))

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
        self.t_start = time.time()
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
            self._check_plan(wait=self.opts.wait_for_plan)   # in already (or awaited): the run starts on it
            run_wall = self._loop(progress)
            self._stop_planner()                   # the run ended before the full plan did
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
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

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
            if self.plan_ref is not None:
                refs.append(self.plan_ref)
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
            if self.plan_ref is not None and self.plan_ref in ready_set:
                self._check_plan()                     # the full plan: re-place what has not started
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
                    except RayTaskError as e:          # its iteration loop stopped (poll says why)
                        self._fail(i, " ".join(str(e.cause if e.cause is not None else e).split())[:500])
                        continue
                    self.reports[i] = res.report
                    self.behind[i] = res.behind_s
                    next_poll[i] = now + opts.min_poll_gap_s
                    if res.completions:
                        self._on_completions(res.completions)
                    if res.failures:
                        self._on_step_failures(self.names[i], res.failures)
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
            if self._settled(rec.id):
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

    def _on_step_failures(self, name: str, failures: list) -> None:
        """A replica's engine failed steps (``replica.StepFailure``): requeue the lines it handed back from
        their prompts; a line in its ``MAX_LINE_FAILURES``-th failing step gets an error line instead."""
        from ..results import SERVER_ERROR

        errors: list[tuple[str, str]] = []
        requeue: list[str] = []
        for f in failures:
            blamed = set(f.blamed)
            for rid in f.ids:
                if self._settled(rid) or rid not in self.by_id:
                    continue
                if rid in blamed:
                    self.line_failures[rid] += 1
                    if self.line_failures[rid] >= MAX_LINE_FAILURES:
                        self.errored[rid] = f.error
                        errors.append((rid, f"the engine failed {self.line_failures[rid]} times running this "
                                            f"request (last on {name}: {f.error})"))
                        continue
                requeue.append(rid)
        if errors:
            log.warning("%d request(s) failed %d times and get an error line: %s", len(errors), MAX_LINE_FAILURES,
                        ", ".join(rid for rid, _ in errors[:10]))
            if self.writer is not None:
                fmt = self.opts.output_format or PLAIN
                self.writer.write_lines(fmt.error(rid, SERVER_ERROR, msg) for rid, msg in errors)
        if requeue:
            self._requeue(list(dict.fromkeys(requeue)))

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
        lost = [rid for rid in ids if not self._settled(rid)]
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
        lost = [q.id for q in self.requests[:self.sent] if not self._settled(q.id) and q.id not in everywhere]
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
        unfinished = [q.id for q in self.requests if not self._settled(q.id)]
        path = self.unfinished_path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(f"{rid}\n" for rid in unfinished))
        return path

    def _all_lost(self) -> ReplicasLostError:
        unfinished = [q.id for q in self.requests if not self._settled(q.id)]
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
                                 predicted_first=first.get(rec.id, -1), cached_tokens=rec.cached_tokens))
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
            controller_failures=list(self.controller_failures), line_errors=sorted(self.errored),
            engines_ready_s=self.engines_ready_s, first_iteration_s=self._first_iteration_s(),
            plan_wall_s=self.plan_wall_s, plan_moved=self.plan_moved, planner_error=self.planner_error)

    def _first_iteration_s(self) -> float:
        """When the first iteration of any replica started (from the driver's start); the clock's start
        if no replica's statistics came back."""
        starts = [st.first_iteration_at for st in self.replica_stats if getattr(st, "first_iteration_at", 0.0)]
        return (min(starts) if starts else self.epoch) - self.t_start

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
