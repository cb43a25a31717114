"""An engine step that raises costs the lines the engine held, not the run.

The replica resets its engine and hands back what had started (``StepFailure``); the driver
requeues those lines from their prompts, as it requeues a lost replica's, and a line that was in
two failing steps gets an error line (OpenAI batch error format, code ``server_error``). First in
process (the actor's loop, no Ray), then through ``run`` on Ray with failures injected into the
emulated engine of the replica actors.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from hybrid_ray.actors.replica import MAX_FAILED_STEPS, ReplicaActor
from hybrid_ray.engines.emulated import EmulatedEngine
from hybrid_ray.policies.base import Scheduler
from hybrid_ray.policies.fcfs import FCFSPrefillFirst
from hybrid_ray.policies.routing import LeastLoadedRouter
from hybrid_ray.results import SERVER_ERROR, plain_error_line, read_results
from hybrid_ray.workload import Request

from helpers import cluster


class FailingEngine(EmulatedEngine):
    """The emulated engine, raising in every step that holds a sequence ``fail(ids)`` picks."""

    def __init__(self, fail):
        super().__init__(0.001)
        self.fail = fail
        self.resets = 0

    async def execute(self, it, state):
        ids = {s.id for s, _ in it.prefill} | (set(state.running) if it.decode else set())
        if self.fail(ids):
            raise RuntimeError(f"injected failure with {sorted(ids)}")
        return await super().execute(it, state)

    def reset(self) -> None:
        self.resets += 1


def _sch() -> Scheduler:
    return Scheduler("fcfs", LeastLoadedRouter(), lambda r: FCFSPrefillFirst())


async def _until(a: ReplicaActor, n_done: int, timeout_s: float = 20.0):
    """Poll until ``n_done`` completions (or a failure); returns (completions, failures)."""
    done, failures = [], []
    t0 = time.time()
    while len(done) < n_done and not failures and time.time() - t0 < timeout_s:
        res = await a.poll(0.05)
        done += res.completions
        failures += res.failures
    return done, failures


def test_a_failed_step_hands_back_what_the_engine_held_and_the_replica_goes_on():
    reqs = [Request(f"r{i}", 30, 20) for i in range(10)]
    fired = []
    eng = FailingEngine(lambda ids: "r5" in ids and not fired and not fired.append(1))
    sch = _sch()

    async def go():
        a = ReplicaActor(cluster(1, max_batch=4).replicas()[0], sch.policy_factory, 0.001, engine=eng)
        await a.add([sch.make_sequence(q) for q in reqs], at=float("-inf"))
        await a.start(time.time(), 0.0)
        done, failures = await _until(a, len(reqs))
        assert len(failures) == 1 and eng.resets == 1 and a.stats.failed_steps == 1
        f = failures[0]
        assert "r5" in f.blamed and set(f.blamed) <= set(f.ids) and "injected failure" in f.error
        _, held = await a.set_controller("ctrl", 1)
        assert set(f.ids).isdisjoint(held)                 # handed back with the poll: no longer held here
        queued = {s.id for s in a.state.waiting} | {s.id for _, _, s in a._arriving}
        assert not set(f.ids) & queued                     # what had started left; the rest stayed queued
        await a.add([sch.make_sequence(next(q for q in reqs if q.id == rid)) for rid in f.ids], gen=1,
                    at=float("-inf"))                      # the driver requeues them from their prompts
        more, again = await _until(a, len(reqs) - len(done))
        assert not again
        await a.finish()
        return done + more

    done = asyncio.run(go())
    assert sorted(d.id for d in done) == sorted(q.id for q in reqs)     # each line once, none lost


def test_an_engine_that_cannot_reset_or_keeps_failing_loses_the_replica():
    sch = _sch()
    reqs = [Request(f"r{i}", 30, 20) for i in range(4)]

    async def go(eng, readd: bool):
        a = ReplicaActor(cluster(1, max_batch=4).replicas()[0], sch.policy_factory, 0.001, engine=eng)
        await a.add([sch.make_sequence(q) for q in reqs], at=float("-inf"))
        await a.start(time.time(), 0.0)
        failures = 0
        with pytest.raises(RuntimeError, match="iteration loop failed: RuntimeError: injected failure"):
            for _ in range(200):
                res = await a.poll(0.05)
                for f in res.failures:
                    failures += 1
                    if readd:                              # as the driver would: back from their prompts
                        await a.add([sch.make_sequence(Request(rid, 30, 20)) for rid in f.ids], at=float("-inf"))
        await a.finish()
        return failures

    no_reset = FailingEngine(lambda ids: True)
    no_reset.reset = None
    assert asyncio.run(go(no_reset, False)) == 0
    assert asyncio.run(go(FailingEngine(lambda ids: True), True)) == MAX_FAILED_STEPS


def test_plain_error_lines_read_back_as_settled(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text(plain_error_line("r7", SERVER_ERROR, "the engine failed 2 times") + "\n")
    res = read_results(p)
    assert not res.records and res.ids == {"r7"}
    assert (res.errors[0].custom_id, res.errors[0].code) == ("r7", SERVER_ERROR)


# -- on Ray: the whole path, through run() ----------------------------------------------------------

CONFIG = """
name: flaky
time_scale: 0.02
groups:
  - name: g
    count: 2
    max_batch_size: 1            # one sequence per step: the failing step holds the culprit alone
    kv_capacity_tokens: 4000
    resources: {CPU: 1}
    cost_model:
      prefill: {floor_s: 0.01, base_s: 0.002, per_token_s: 2.0e-05, per_token_sq_s: 5.0e-10}
      decode: {base_s: 0.006, per_seq_s: 7.0e-06, per_ctx_token_s: 1.7e-07}
"""


def flaky_scheduler(bad: str, once: str, marker: str) -> Scheduler:
    """FCFS; its policy factory, run in each replica actor's process, makes the emulated engine there
    raise in every step holding ``bad``, and in the first step (over all replicas: a marker file)
    holding ``once``."""

    def factory(state):
        import os

        from hybrid_ray.engines import emulated

        if not getattr(emulated.EmulatedEngine, "flaky", False):
            run = emulated.EmulatedEngine.execute

            async def execute(self, it, st):
                ids = {s.id for s, _ in it.prefill} | (set(st.running) if it.decode else set())
                if bad in ids:
                    raise RuntimeError(f"injected: {bad} always fails")
                if once in ids and not os.path.exists(marker):
                    open(marker, "w").close()
                    raise RuntimeError(f"injected: {once} fails once")
                return await run(self, it, st)

            emulated.EmulatedEngine.execute = execute
            emulated.EmulatedEngine.flaky = True
        return FCFSPrefillFirst()

    return Scheduler("flaky", LeastLoadedRouter(), factory)


@pytest.mark.ray
def test_failed_steps_requeue_and_a_twice_failing_line_gets_an_error_line(ray_session, tmp_path):
    from hybrid_ray.openai_batch import output_lines
    from hybrid_ray.runtime import RunOptions, run

    ids = [f"q{i}" for i in range(12)]
    inp, out, cfg = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "flaky.yaml"
    inp.write_text("".join(json.dumps({"custom_id": c, "method": "POST", "url": "/v1/completions",
                                       "body": {"model": "m", "prompt": f"question {c} " * 8, "max_tokens": 12}})
                           + "\n" for c in ids))
    cfg.write_text(CONFIG)
    res = run(RunOptions(config=str(cfg), workload=str(inp), output=str(out), progress=False),
              scheduler=flaky_scheduler("q3", "q7", str(tmp_path / "q7-failed")))
    assert (tmp_path / "q7-failed").exists()
    assert res.line_errors == ["q3"] and res.failed_replicas == [] and res.requeued == 2
    assert res.summary.requests_completed == 11
    lines = output_lines(out)
    assert [o["custom_id"] for o in lines] == ids                       # every line once, in input order
    err = {o["custom_id"]: o["error"] for o in lines if o["error"] is not None}
    assert list(err) == ["q3"] and err["q3"]["code"] == SERVER_ERROR and err["q3"]["line"] == 4
    assert "failed 2 times" in err["q3"]["message"] and "q3 always fails" in err["q3"]["message"]
    assert all(o["response"]["status_code"] == 200 for o in lines if o["custom_id"] != "q3")
    again = run(RunOptions(config=str(cfg), workload=str(inp), output=str(out), resume=str(out), progress=False),
                scheduler=flaky_scheduler("q3", "q7", str(tmp_path / "q7-failed")))
    assert again.summary is None and again.skipped == 12                 # the error line settles q3
