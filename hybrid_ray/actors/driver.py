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

Output lengths: the driver owns the scheduler's length predictor. Each completion tells it a true
length (``observe``); when that moves its predictions (``version``), the new table goes to the
controller, which has every replica re-predict its queued work and rebalances, as ``simulate`` does.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..config import ClusterSpec
from ..engines import engine_spec
from ..errors import HybridRayError, ReplicasLostError, RuntimeSetupError
from ..progress import Progress
from ..replica import FINISHED, LoadReport, ReplicaState, Sequence
from ..results import PLAIN, CompletionRecord, ResultsWriter
from ..runspec import RunOptions, RunResult, engine_label   # not ..runtime: it imports this module
from ..workload import Request
from .session import actor_options, check_resources, connect_ray, describe_resources, group_resources, local_cpus

log = logging.getLogger(__name__)

UNFINISHED_DEFAULT = "hybrid-ray-unfinished.txt"


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
                                           workers=self.opts.plan_workers, seed=seed)
            self.msgs["plan"] += 1
            ready, _ = ray.wait([ref], timeout=self.opts.plan_time_limit_s + self.opts.startup_timeout_s)
            if not ready:
                raise RuntimeSetupError("the planner actor did not answer in time (is the cluster out of CPUs?)")
            plan = ray.get(ref)
            self.plan = plan
            ray.kill(self.planner)
            self.planner = None
        return build_scheduler(self.opts.policy, self.cluster, self.requests, plan=plan, lengths=self.opts.lengths,
                               seed=seed, predictor=predictor)

    def _create_actors(self, per_replica: dict[str, dict[str, float]]) -> None:
        import ray

        from . import remote_class
        from .controller import ControllerActor
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
        self.controller = remote_class(ControllerActor).options(
            name=f"hybrid-ray-{self.run_id}-controller", num_cpus=0, max_restarts=0, max_concurrency=1000,
        ).remote(self.cluster, sch.router, sch.controller, self.handles, ts, dispatcher=sch.dispatcher)
        ray.get(self.controller.ready.remote(), timeout=self.opts.startup_timeout_s)
        self.msgs["ready"] += 1

    # -- run ----------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        import ray

        t_wall0 = time.perf_counter()
        self.run_id = uuid.uuid4().hex[:8]
        per_replica = group_resources(self.cluster, self.opts.cpus_per_replica)
        owns = connect_ray(self.opts.address, local_cpus(self.cluster, per_replica), self.opts.connect_timeout_s)
        progress = Progress(self.total, self.opts.progress)
        try:
            check_resources(self.cluster.groups, per_replica, ray.cluster_resources(),
                            [n["Resources"] for n in ray.nodes() if n.get("Alive")])
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
                ray.shutdown()
        return self._result(states, cstats, time.perf_counter() - t_wall0, run_wall)

    def _loop(self, progress: Progress) -> float:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        from .clock import ModelClock

        sch, ctrl, reqs, opts = self.scheduler, self.controller, self.requests, self.opts
        n = len(reqs)
        k = 0
        while k < n and reqs[k].arrival_s == self.t_first:
            k += 1
        if k:
            self._controller_call(lambda: self._await(ctrl.route.remote([sch.make_sequence(q) for q in reqs[:k]]),
                                                      "route the first batch"))
            self.msgs["route"] += 1
        self.epoch = time.time() + 0.05            # the start reaches every actor before the clock runs
        clock = ModelClock(self.epoch, self.t_first, self.cluster.time_scale)
        starts = [h.start.remote(self.epoch, self.t_first, ctrl) for h in self.handles]
        starts.append(ctrl.start.remote(self.epoch, self.t_first))
        self.msgs["start"] += len(starts)
        self._await_all(starts, "start the actors")
        poll_ref: dict[int, Any] = {}
        poll_sent: dict[int, float] = {}
        next_poll = [0.0] * len(self.handles)
        route_refs: list = []
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
                    route_refs.append(ctrl.route.remote([sch.make_sequence(q) for q in reqs[k:j]]))
                    self.msgs["route"] += 1
                    k = j
                    next_dispatch = now + opts.dispatch_gap_s
            for i in sorted(self.live):
                if i not in poll_ref and now >= next_poll[i]:
                    poll_ref[i] = self.handles[i].poll.remote(opts.poll_wait_s)
                    poll_sent[i] = now
                    self.msgs["poll"] += 1
            refs = list(poll_ref.values()) + route_refs + self.pred_refs
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
            for r in [r for r in route_refs if r in ready_set]:
                route_refs.remove(r)
                self._controller_call(lambda: ray.get(r))   # other controller failures are fatal
            for r in [r for r in self.pred_refs if r in ready_set]:
                self.pred_refs.remove(r)
                ray.get(r)
                self._push_predictions()               # a version that moved meanwhile
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
                elif now - poll_sent[i] > opts.poll_wait_s + opts.heartbeat_timeout_s:
                    del poll_ref[i]
                    self._fail(i, f"no answer for {opts.heartbeat_timeout_s:.0f} s")
            progress.update(self.done, self.tokens, max(self.last_finish - self.t_first, 0.0), now - self.epoch,
                            self._queues())
        progress.update(self.done, self.tokens, max(self.last_finish - self.t_first, 0.0), time.time() - self.epoch,
                        self._queues(), force=True)
        for r in route_refs:
            try:
                ray.get(r, timeout=self.opts.heartbeat_timeout_s)
            except GetTimeoutError:
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
        import ray

        if i not in self.live:
            return
        self.live.discard(i)
        name = self.names[i]
        self.failed.append(name)
        self.failure_reasons[name] = reason
        log.warning("replica %s failed: %s", name, reason)
        try:
            ray.kill(self.handles[i], no_restart=True)   # fence: it must not finish anything late
        except Exception:                                 # noqa: BLE001 -- already gone
            pass
        if not self.live:
            raise self._all_lost()
        ids = self._await(self.controller.replica_failed.remote(i), "book the failed replica")
        self.msgs["replica_failed"] += 1
        lost = [rid for rid in ids if rid not in self.completed]
        if lost:
            seqs = [self.scheduler.make_sequence(self.by_id[rid]) for rid in lost]
            self._controller_call(lambda: self._await(self.controller.requeue.remote(seqs),
                                                      "requeue the failed replica's requests"))
            self.msgs["requeue"] += 1
            self.requeued += len(lost)

    def _controller_call(self, call: Callable[[], Any]) -> Any:
        """Run a controller call; if it found every replica dead, the run is lost."""
        from .controller import NoLiveReplicaError

        try:
            return call()
        except NoLiveReplicaError:
            for i in sorted(self.live):
                self.live.discard(i)
                self.failed.append(self.names[i])
                self.failure_reasons[self.names[i]] = "unreachable from the controller"
            raise self._all_lost() from None

    def _all_lost(self) -> ReplicasLostError:
        unfinished = [q.id for q in self.requests if q.id not in self.completed]
        path = self.unfinished_path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(f"{rid}\n" for rid in unfinished))
        shown = ", ".join(unfinished[:20]) + (f" ... (+{len(unfinished) - 20} more)" if len(unfinished) > 20 else "")
        reasons = "; ".join(f"{n}: {self.failure_reasons[n]}" for n in self.failed)
        how = (f"the {self.done} finished requests are in {self.opts.output}: rerun with --resume {self.opts.output}"
               if self.opts.output else "rerun with --output FILE to keep finished requests across failures")
        return ReplicasLostError(
            f"all {len(self.handles)} replicas failed ({reasons}); {len(unfinished)} of {self.total} requests "
            f"unfinished: {shown}; their ids are in {path}; {how}", unfinished, path)

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
        cstats = ray.get(self.controller.stop.remote(), timeout=self.opts.startup_timeout_s)
        self.msgs["stop"] += 1
        return states, cstats

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
            plan=self.plan, output=self.opts.output, engine=engine_label(self.opts))

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
