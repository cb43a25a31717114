"""Ray runtime: the same policies as the simulator on actors, with faults, resume and bad inputs.

Tests marked ``ray`` share one local Ray session (8 logical CPUs: emulated replicas only sleep).
The first tests drive a ``ReplicaActor`` in-process (no Ray) against the simulator.
"""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from hybrid_ray.actors.replica import ReplicaActor
from hybrid_ray.cli import main
from hybrid_ray.inputs import load_inputs
from hybrid_ray.planning import build_scheduler
from hybrid_ray.policies.controller import RebalanceController
from hybrid_ray.policies.routing import RoundRobinRouter
from hybrid_ray.results import read_results
from hybrid_ray.runtime import ReplicasLostError, RunOptions, RuntimeSetupError, connect_ray, run
from hybrid_ray.simulator import simulate

SIM_KEYS = {"policy", "config", "requests_total", "requests_completed", "makespan_s", "utilization_busy",
            "utilization_slots", "throughput_tok_s", "output_tokens", "ttft_p50_s", "ttft_p99_s", "e2e_p99_s",
            "preemptions", "moves", "iterations", "replica_finish_s", "lower_bound_s", "gap"}
RUN_KEYS = {"wall_s", "failed_replicas", "requeued", "controller_decision_p99_s", "messages_per_request",
            "engines_ready_s", "first_iteration_s", "plan_wall_s"}
PAPER = dict(config="paper_llama65b", cpus_per_replica=1.0, progress=False)   # 4 replicas, batch 8, GPUs emulated


# -- in-process: the actor's loop is the simulator's ------------------------------------------------

async def _drive(cluster, scheduler, requests, sim_record, time_scale):
    """Run one ReplicaActor per replica in this event loop, with the simulator's routing."""
    where = {s.id: int(s.replica.rsplit("-", 1)[1]) for s in sim_record.sequences}
    actors = [ReplicaActor(spec, scheduler.policy_factory, time_scale) for spec in cluster.replicas()]
    epoch = time.time() + 0.02
    for a in actors:
        await a.start(epoch, 0.0)
    for q in sorted(requests, key=lambda q: q.arrival_s):
        delay = epoch + q.arrival_s * time_scale - 0.05 - time.time()   # 50 ms early, as the driver sends
        if delay > 0:
            await asyncio.sleep(delay)
        await actors[where[q.id]].add([scheduler.make_sequence(q)], 0, float("-inf"))
    done = []
    while len(done) < len(requests):
        for a in actors:
            done += (await a.poll(0.0)).completions
        await asyncio.sleep(0.002)
    states = [await a.finish() for a in actors]
    return {d.id: d for d in done}, states


def test_actor_loop_reproduces_the_simulator_exactly():
    cluster, requests = load_inputs("paper_llama65b", "gsm8k", 60)
    rec = simulate(cluster, build_scheduler("baseline", cluster, requests), requests)
    sch = build_scheduler("baseline", cluster, requests)
    done, states = asyncio.run(_drive(cluster, sch, requests, rec, 0.001))
    assert len(done) == len(requests)
    for s in rec.sequences:
        d = done[s.id]
        assert d.replica == s.replica
        assert d.first_token_s == pytest.approx(s.first_token_s, abs=1e-9)
        assert d.finish_s == pytest.approx(s.finish_s, abs=1e-9)
    assert sum(len(st.records) for st in states) == sum(len(r.records) for r in rec.replicas)


def test_actor_loop_with_arrivals_matches_the_simulator():
    cluster, requests = load_inputs("local", "azure-conv", 80)
    rec = simulate(cluster, build_scheduler("baseline", cluster, requests), requests)
    done, _ = asyncio.run(_drive(cluster, build_scheduler("baseline", cluster, requests), requests, rec, 0.01))
    finish = max(d.finish_s for d in done.values())
    assert finish == pytest.approx(rec.makespan_s, rel=0.01)
    same = sum(abs(done[s.id].first_token_s - s.first_token_s) < 1e-6 for s in rec.sequences)
    assert same >= 0.95 * len(requests)        # sent early, held until their arrival: the same timeline


def test_actor_take_back_and_drain():
    cluster, requests = load_inputs("paper_llama65b", "gsm8k", 30)
    sch = build_scheduler("baseline", cluster, requests)

    async def go():
        a = ReplicaActor(cluster.replicas()[0], sch.policy_factory, 1.0)
        await a.add([sch.make_sequence(q) for q in requests[:20]], tag=3)
        assert a.report().waiting == 20 and a.report().movable == 20 and a.tag == 3
        taken = await a.take_back(5)
        assert [s.id for s in taken] == [q.id for q in requests[15:20][::-1]]   # newest first
        await a.start(time.time(), 0.0)
        await asyncio.sleep(0.2)                       # a few real iterations at time_scale 1
        rest = await a.drain()
        done = (await a.poll(0.0)).completions
        assert {s.id for s in rest} | {d.id for d in done} == {q.id for q in requests[:15]}
        assert all(s.status == 0 and s.prefilled == 0 for s in rest)   # reset for recompute elsewhere
        assert a.stats.iterations >= 1

    asyncio.run(go())


# -- on Ray -----------------------------------------------------------------------------------------

def _ids_once(path, expected):
    res = read_results(path)
    assert res.duplicates == [], f"duplicates in {path}: {res.duplicates[:5]}"
    assert res.ids == set(expected)
    return res


@pytest.mark.ray
def test_plan_dispatch_complete(ray_session, tmp_path):
    """offline: plan in the PlannerActor, dispatch, every request once; same plan in the simulator
    agrees. A library caller's SIGTERM handler is its own again after the run."""
    import signal

    out = tmp_path / "res.jsonl"

    def callers_handler(signum, frame):
        pass

    prev = signal.signal(signal.SIGTERM, callers_handler)
    try:
        res = run(RunOptions(policy="offline", limit=120, output=str(out), plan_method="lpt", wait_for_plan=True,
                             **PAPER))
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, prev)
    cluster, requests = load_inputs("paper_llama65b", "gsm8k", 120)
    _ids_once(out, [q.id for q in requests])
    data = res.to_dict()
    assert SIM_KEYS | RUN_KEYS <= set(data)
    s = res.summary
    assert s.requests_completed == s.requests_total == 120
    assert res.plan is not None and set(res.plan.assignment) == {q.id for q in requests}
    on = {d.id: d.replica for d in read_results(out).records}
    assert on == res.plan.assignment                    # the plan's assignment was carried out
    assert s.makespan_s >= s.lower_bound_s > 0
    assert 0 < s.utilization_slots <= s.utilization_busy <= 1
    assert data["failed_replicas"] == 0 and data["requeued"] == 0
    assert data["controller_decision_p99_s"] > 0        # timed and reported; its bound: `bench load` (slow test)
    assert 0 < data["messages_per_request"] < 10
    assert s.output_tokens == sum(q.output_tokens for q in requests)
    sim = simulate(cluster, build_scheduler("offline", cluster, requests, plan=res.plan), requests)
    assert s.makespan_s == pytest.approx(sim.makespan_s, rel=0.05)


@pytest.mark.ray
@pytest.mark.parametrize("policy, knobs, time_scale, pull", [
    ("baseline", {}, None, False),
    ("hybrid", {}, None, False),                                     # plan + Lagrangian rule + controller
    # pull-based dispatcher: blocks of 8, the next one released when one completes. Each hand-off goes
    # through Ray, and the replica idles or runs a thinner batch meanwhile: Ray's latency / time_scale is
    # modelled time the simulator does not have, and it grows with the host's load (on a 2-core host
    # kept busy by other processes, up to 2x the makespan here). So the makespan is checked from below
    # only (the run can add latency, not remove work); how close it comes on a quiet host is the
    # `run-vs-simulate` benchmark table in docs/runtime.md. The work itself is compared exactly.
    ("raydata", {"raydata": {"batch_size": 8, "max_concurrent_batches": 1}}, 0.1, True),
    # the hybrid's late-binding mode: Serve's bounded queues fed longest first, pull-based like raydata
    ("hybrid", {"hybrid": {"dispatch": "bounded"}}, 0.1, True),
])
def test_run_agrees_with_simulate(ray_session, policy, knobs, time_scale, pull):
    cluster, requests = load_inputs("paper_llama65b", "gsm8k", 120)
    cluster = replace(cluster, policy=knobs)
    res = run(RunOptions(policy=policy, plan_method="lpt", time_scale=time_scale, wait_for_plan=True, **PAPER),
              cluster=cluster, requests=requests)
    sim = simulate(cluster, build_scheduler(policy, cluster, requests, plan=res.plan), requests)
    sim_iterations = sum(len(r.records) for r in sim.replicas)
    assert res.summary.requests_completed == 120
    assert res.summary.output_tokens == sum(q.output_tokens for q in requests)
    if pull:
        assert res.summary.makespan_s >= 0.95 * sim.makespan_s
        assert res.summary.iterations >= 0.95 * sim_iterations
    else:
        assert res.summary.makespan_s == pytest.approx(sim.makespan_s, rel=0.05)
        assert res.summary.iterations == pytest.approx(sim_iterations, rel=0.05)
    if "dispatch" in knobs.get("hybrid", {}):
        assert res.plan.info["dispatch"] == "bounded" and res.plan.method == "bounded"
        assert res.messages["add"] > 2 * len(cluster.replicas())      # released over time, not all at once
    if policy != "hybrid":           # no timing-driven moves: the same iterations, the same modelled busy time
        assert res.summary.iterations == sim_iterations
        busy = [sum(it.end_s - it.start_s for r in rec.replicas for it in r.records) for rec in (res.record, sim)]
        assert busy[0] == pytest.approx(busy[1], rel=1e-9)


@pytest.mark.ray
def test_controller_moves_work(ray_session):
    """Round robin + the rebalancing controller: moves are carried out (take_back + add), nothing is lost."""
    cluster, requests = load_inputs("paper_llama65b", "gsm8k", 200)

    def scheduler():
        sch = build_scheduler("baseline", cluster, requests)
        sch.router, sch.controller = RoundRobinRouter(), RebalanceController(1.0, 0.5, 0.01, 4)
        return sch

    sim = simulate(cluster, scheduler(), requests)
    res = run(RunOptions(time_scale=0.05, **PAPER), cluster=cluster, requests=requests, scheduler=scheduler())
    assert sim.moves > 0 and res.summary.moves > 0
    assert res.messages.get("take_back", 0) > 0
    assert res.summary.requests_completed == 200
    assert res.summary.makespan_s == pytest.approx(sim.makespan_s, rel=0.1)


@pytest.mark.ray
def test_replica_killed_mid_run(ray_session, tmp_path):
    out = tmp_path / "res.jsonl"
    killed = {}

    def hook(d):
        if not killed and d.done >= 40:
            killed["at"] = d.done
            ray_session.kill(d.handles[1])

    res = run(RunOptions(limit=200, output=str(out), time_scale=0.05, **PAPER), hook=hook)
    cluster, requests = load_inputs("paper_llama65b", "gsm8k", 200)
    rf = _ids_once(out, [q.id for q in requests])
    assert killed["at"] < 200
    assert res.failed_replicas == ["llama65b-tp2-1"] and res.to_dict()["failed_replicas"] == 1
    assert 0 < res.requeued <= 200 // 4 + 1
    assert res.summary.requests_completed == 200
    on_dead = [r for r in rf.records if r.replica == "llama65b-tp2-1"]
    assert len(on_dead) + res.requeued == 50           # least-loaded put 50 there: finished or recomputed
    sim = simulate(cluster, build_scheduler("baseline", cluster, requests), requests)
    assert res.summary.makespan_s > sim.makespan_s     # three replicas did the fourth one's rest


@pytest.mark.ray
def test_all_replicas_killed_then_resume(ray_session, tmp_path):
    out = tmp_path / "res.jsonl"
    cluster, requests = load_inputs("paper_llama65b", "gsm8k", 200)

    def hook(d):
        if d.done >= 30:
            for i in sorted(d.live):
                ray_session.kill(d.handles[i])

    # a heartbeat far longer than the run: a loaded host must not time out a live replica, and the kills
    # must be seen from the actors' deaths, not waited out (the message would say "no answer for 120 s")
    with pytest.raises(ReplicasLostError) as info:
        run(RunOptions(limit=200, output=str(out), time_scale=0.05, heartbeat_timeout_s=120, **PAPER), hook=hook)
    err = info.value
    finished = read_results(out).ids
    assert len(finished) >= 30
    assert set(err.unfinished) == {q.id for q in requests} - finished
    assert err.path == f"{out}.unfinished.txt"
    assert open(err.path).read().split() == err.unfinished
    msg = str(err)
    assert "all 4 replicas failed" in msg and err.unfinished[0] in msg and f"--resume {out}" in msg
    assert "no answer for" not in msg
    assert msg.count(": actor died (") + msg.count(": unreachable from the controller") == 4, msg

    res = run(RunOptions(limit=200, resume=str(out), time_scale=0.05, **PAPER))
    _ids_once(out, [q.id for q in requests])
    assert res.skipped == len(finished)
    assert res.summary.requests_total == 200 - len(finished)


@pytest.mark.ray
def test_driver_crash_then_resume_with_truncated_line(ray_session, tmp_path):
    out = tmp_path / "res.jsonl"
    cluster, requests = load_inputs("paper_llama65b", "gsm8k", 200)

    class Crash(Exception):
        pass

    def hook(d):
        if d.done >= 50:
            raise Crash()

    with pytest.raises(Crash):
        run(RunOptions(limit=200, output=str(out), time_scale=0.05, **PAPER), hook=hook)
    before = read_results(out).ids
    assert 50 <= len(before) < 200
    with open(out, "a") as fh:
        fh.write('{"id": "gsm8k-199", "replica": "llama65b-tp2-0", "arri')   # died mid-line
    assert read_results(out).truncated_tail
    res = run(RunOptions(limit=200, resume=str(out), **PAPER))
    rf = _ids_once(out, [q.id for q in requests])
    assert not rf.truncated_tail
    assert res.skipped == len(before)
    assert res.summary.requests_completed == 200 - len(before)
    assert run(RunOptions(limit=200, resume=str(out), **PAPER)).summary is None   # nothing left


@pytest.mark.ray
def test_cli_run_json(ray_session, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["run", "--config", "paper_llama65b", "--cpus-per-replica", "0.5", "--limit", "40",
                 "--no-progress", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert SIM_KEYS | RUN_KEYS <= set(data)
    assert data["requests_completed"] == data["requests_total"] == 40 and data["failed_replicas"] == 0
    text = capsys.readouterr().out
    assert "total inference time" in text and "Ray messages per request" in text and "40/40 completed" in text


@pytest.mark.ray
def test_existing_output_needs_resume(ray_session, tmp_path):
    out = tmp_path / "res.jsonl"
    out.write_text('{"id": "x"}\n')
    with pytest.raises(RuntimeSetupError, match="--resume"):
        run(RunOptions(limit=5, output=str(out), **PAPER))


# -- planning overlaps the engines' start -------------------------------------------------------------

def _test_planner(gate: str | None = None, fail: str | None = None, dispatch: str | None = None):
    """A planner actor class for ``Driver.planner_class`` (a local class: Ray pickles it by value). It
    answers only once ``gate`` exists (the test's hook writes it at the run's first completions, so the
    plan arrives mid-run whatever the host's speed), with the initial plan rotated by one replica: every
    request it re-places moves. ``fail``: it raises, or its process dies, instead."""
    from hybrid_ray.actors.planner import PlannerActor

    class TestPlanner(PlannerActor):
        def plan(self, cluster, requests, predicted_output=None, **opts):
            import os
            import time

            from hybrid_ray.planner.initial import initial_plan

            while gate is not None and not os.path.exists(gate):
                time.sleep(0.01)
            if fail == "raise":
                raise ValueError("a bug in the planner\nwith a second line")
            if fail == "die":
                os._exit(1)
            p = initial_plan(cluster, requests, predicted_output)
            names = [r.name for r in cluster.replicas()]
            nxt = {n: names[(k + 1) % len(names)] for k, n in enumerate(names)}
            p.assignment = {rid: nxt[n] for rid, n in p.assignment.items()}
            p.order = {nxt[n]: ids for n, ids in p.order.items()}
            p.predicted_finish_s = {nxt[n]: f for n, f in p.predicted_finish_s.items()}
            p.info = dict(p.info, initial=False, rotated=True, **({"dispatch": dispatch} if dispatch else {}))
            return p

    return TestPlanner


def _gate_hook(gate, seen: dict):
    def hook(d):
        seen["driver"] = d
        if not gate.exists():
            seen["done_at_gate"] = d.done
            gate.write_text("go")
    return hook


@pytest.mark.ray
@pytest.mark.parametrize("policy, dispatch, knobs", [
    ("offline", None, {}),
    ("hybrid", None, {}),
    ("hybrid", "bounded", {}),                                  # the full plan binds late: a dispatcher takes over
    ("hybrid", "bounded", {"hybrid": {"dispatch": "bounded"}}),  # both do: what the first held back is re-placed
])
def test_run_starts_on_the_initial_plan_while_a_slow_planner_works(ray_session, tmp_path, monkeypatch, policy,
                                                                   dispatch, knobs):
    """The replicas run the initial plan (LPT) from the start; the full plan, arriving mid-run, re-places
    only what has not started: every request finishes once, each that had started where it started."""
    from hybrid_ray.actors.driver import Driver

    gate, out, seen = tmp_path / "gate", tmp_path / "res.jsonl", {}
    monkeypatch.setattr(Driver, "planner_class", _test_planner(gate=str(gate), dispatch=dispatch))
    cluster, requests = load_inputs("paper_llama65b", "gsm8k", 120)
    res = run(RunOptions(policy=policy, output=str(out), time_scale=0.2, plan_method="lpt", **PAPER),
              hook=_gate_hook(gate, seen), cluster=replace(cluster, policy=knobs), requests=requests)
    initial = seen["driver"].initial_plan
    assert initial.info["initial"] and initial.info.get("dispatch") == ("bounded" if knobs else None)
    done = _ids_once(out, [q.id for q in requests])
    assert res.summary.requests_completed == 120 and res.planner_error is None
    assert res.plan.info.get("rotated") and res.plan_wall_s is not None      # the full plan was switched to
    assert res.engines_ready_s <= res.first_iteration_s < res.plan_wall_s   # work started before it came
    assert 0 < seen["done_at_gate"] < 120
    on = {r.id: r.replica for r in done.records}
    kept = seen["driver"].plan_kept                 # started (or finished) when it came: left alone
    assert kept and all(on[rid] == name for rid, name in kept.items())
    assert res.plan_moved > 0 and len(kept) + res.plan_moved <= 120
    data = res.to_dict()
    assert data["plan_moved"] == res.plan_moved and data["plan_wall_s"] == res.plan_wall_s
    if policy == "offline":                         # no controller: the rest ran where the full plan put them
        assert len(kept) + res.plan_moved == 120
        assert all(on[q.id] == res.plan.assignment[q.id] for q in requests if q.id not in kept)


@pytest.mark.ray
@pytest.mark.parametrize("fail", ["raise", "die"])
def test_a_failed_planner_leaves_the_run_on_the_initial_plan(ray_session, tmp_path, monkeypatch, capfd, caplog,
                                                             fail):
    """A planner that raises, or whose process dies, mid-run: one warning line, no traceback, and the
    run completes on the initial plan."""
    from hybrid_ray.actors.driver import Driver

    gate, out, seen = tmp_path / "gate", tmp_path / "res.jsonl", {}
    monkeypatch.setattr(Driver, "planner_class", _test_planner(gate=str(gate), fail=fail))
    res = run(RunOptions(policy="hybrid", limit=120, output=str(out), time_scale=0.5, **PAPER),
              hook=_gate_hook(gate, seen))
    _ids_once(out, [q.id for q in load_inputs("paper_llama65b", "gsm8k", 120)[1]])
    assert res.summary.requests_completed == 120 and seen["done_at_gate"] < 120
    assert res.plan.info.get("initial") and res.plan_wall_s is None and res.plan_moved == 0
    warned = [r.getMessage() for r in caplog.records if "planner" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert warned[0].startswith("the planner failed (") and "initial plan" in warned[0]
    assert res.planner_error and ("a bug in the planner" in res.planner_error if fail == "raise"
                                  else "died" in res.planner_error)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.ray
def test_missing_gpus_fail_fast(ray_session, monkeypatch):
    """Fast = before planning and before any actor asks Ray for the GPUs it would wait for (counted)."""
    from hybrid_ray.actors.driver import Driver

    reached = []
    monkeypatch.setattr(Driver, "_make_scheduler", lambda self: reached.append("plan"))
    monkeypatch.setattr(Driver, "_create_actors", lambda self, per_replica: reached.append("actors"))
    with pytest.raises(RuntimeSetupError) as info:
        run(RunOptions(config="paper_llama65b", limit=5, progress=False))
    assert reached == []
    msg = str(info.value)
    assert "'llama65b-tp2'" in msg and "2 GPU per replica" in msg and "largest node: 0 GPU" in msg
    assert "CPU 8" in msg and "--cpus-per-replica" in msg


@pytest.mark.ray
def test_too_many_cpus_fail_fast(ray_session):
    with pytest.raises(RuntimeSetupError) as info:
        run(RunOptions(config="paper_llama65b", cpus_per_replica=3, limit=5, progress=False))
    msg = str(info.value)
    assert "'llama65b-tp2' 4 x 3" in msg and "12 CPU needed" in msg and "has 8 CPU" in msg


@pytest.mark.ray
def test_bad_addresses_fail_fast(ray_session, monkeypatch):
    """Fast = one bounded TCP probe at most, never ray.init's minutes of retries (counted, not timed)."""
    from types import SimpleNamespace

    import ray

    from hybrid_ray.actors import session

    probes, inits = [], []
    connect = session.socket.create_connection

    def probe(addr, timeout=None, *a, **k):
        probes.append((addr, timeout))
        return connect(addr, timeout, *a, **k)

    monkeypatch.setattr(session, "socket", SimpleNamespace(create_connection=probe))
    monkeypatch.setattr(ray, "init", lambda *a, **k: inits.append(a or k))
    with pytest.raises(RuntimeSetupError, match="cannot reach 127.0.0.1:1"):
        connect_ray("127.0.0.1:1", timeout_s=5)
    assert probes == [(("127.0.0.1", 1), 5.0)] and inits == []
    with pytest.raises(RuntimeSetupError, match="ray job submit"):
        connect_ray("http://127.0.0.1:8265")
    with pytest.raises(RuntimeSetupError, match="not a number"):
        connect_ray("127.0.0.1:http")
    assert len(probes) == 1 and inits == []           # both refused before any connection attempt


def _grown(tmp_path, count: int, config: str = "local"):
    """A bundled config with ``count`` replicas per group, written to a file of its own."""
    import yaml

    from hybrid_ray.config import load_cluster

    cl = load_cluster(config)
    data = {"name": "big", "time_scale": cl.time_scale,
            "groups": [dict(g.to_dict(), count=count) for g in cl.groups]}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_cluster(str(path)), path


def test_replica_count_the_machine_cannot_hold_fails_before_ray(tmp_path):
    from hybrid_ray.actors.session import check_local_capacity, group_resources

    big, path = _grown(tmp_path, 1000)
    with pytest.raises(RuntimeSetupError) as info:
        check_local_capacity(big, group_resources(big, None), cores=2, real_engine=False)
    msg = str(info.value)
    assert msg.startswith(f"{path}: 'llama7b' 1000 x 1 CPU = 1000 replicas, too many for a local Ray")
    assert "its 2 cores host at most 16 emulated replicas" in msg and "--address" in msg and "\n" not in msg
    ten, _ = _grown(tmp_path, 10)
    with pytest.raises(RuntimeSetupError, match="'llama7b' 10 x 4 CPU = 40 CPU, too many"):   # few, but big
        check_local_capacity(ten, {"llama7b": {"CPU": 4.0}}, cores=2, real_engine=False)
    small, _ = _grown(tmp_path, 16)
    check_local_capacity(small, {"llama7b": {"CPU": 0.1}}, cores=2, real_engine=False)   # bench load's shape
    check_local_capacity(small, group_resources(small, None), cores=2, real_engine=False)
    tiny, _ = _grown(tmp_path, 2, "cpu_tiny")
    check_local_capacity(tiny, group_resources(tiny, None), cores=2, real_engine=True)   # one core each
    with pytest.raises(RuntimeSetupError, match="'tiny' 2 x 2 CPU = 4 CPU for real engines, but this machine has 2"):
        check_local_capacity(tiny, group_resources(tiny, 2.0), cores=2, real_engine=True)


def test_cli_replica_count_fails_fast_without_starting_ray(tmp_path, monkeypatch, capsys):
    import ray

    from hybrid_ray.actors import driver as driver_mod

    _, path = _grown(tmp_path, 1000)
    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)        # as from a shell, whatever ran before
    monkeypatch.setattr(driver_mod, "connect_ray", lambda *a, **k: started.append(a) or pytest.fail("Ray started"))
    monkeypatch.setattr(driver_mod.os, "cpu_count", lambda: 2)
    assert main(["run", "--config", str(path), "--limit", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert started == []
    assert err.count("\n") == 1 and err.startswith(f"hybrid-ray: error: {path}: 'llama7b' 1000 x 1 CPU = 1000 replicas")


def test_remote_cluster_too_small_names_the_config_file():
    from hybrid_ray.actors.session import check_resources
    from hybrid_ray.config import load_cluster

    cl = load_cluster("local")
    with pytest.raises(RuntimeSetupError) as info:
        check_resources(cl.groups, {"llama7b": {"CPU": 1.0}}, {"CPU": 3.0}, [{"CPU": 2.0}, {"CPU": 1.0}],
                        source="big.yaml")
    assert str(info.value).startswith(
        "big.yaml: group 'llama7b' 4 x 1 CPU = 4 CPU needed, but the Ray cluster has 3 CPU")


def test_inside_a_ray_job_no_address_means_the_jobs_cluster(monkeypatch):
    from hybrid_ray.actors.session import describe_address, effective_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert effective_address(None) is None and describe_address(None) == "local"
    assert describe_address("auto") == "auto" and describe_address("local") == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")          # what `ray job submit` sets for the entrypoint
    assert effective_address(None) == "auto" and effective_address("") == "auto"
    assert describe_address(None) == "the job's cluster via RAY_ADDRESS"
    assert effective_address("10.0.0.1:6379") == "10.0.0.1:6379"   # an explicit address wins


def test_engine_comes_from_the_flag_else_the_config_else_emulated():
    from dataclasses import replace

    from hybrid_ray.config import EngineChoice, load_cluster
    from hybrid_ray.runtime import engine_label, resolve_engine

    local, tiny = load_cluster("local"), load_cluster("cpu_tiny")
    r = resolve_engine(RunOptions(), local)
    assert (r.engine, r.model, r.device, engine_label(r)) == ("emulated", None, "cpu", "emulated")
    r = resolve_engine(RunOptions(), tiny)
    assert (r.engine, r.model, r.device, engine_label(r)) == ("transformers", "tiny", "cpu", "transformers (tiny, cpu)")
    r = resolve_engine(RunOptions(engine="emulated"), tiny)                    # the flag wins
    assert (r.engine, r.model) == ("emulated", None)
    r = resolve_engine(RunOptions(model="small"), tiny)                        # per-field override
    assert (r.engine, r.model, r.device) == ("transformers", "small", "cpu")
    gpu = replace(tiny, engine=EngineChoice("transformers", "llama-7b", "cuda"))
    r = resolve_engine(RunOptions(engine="vllm", model="/m"), gpu)             # another kind: not the config's
    assert (r.engine, r.model, r.device) == ("vllm", "/m", "cpu")


@pytest.mark.ray
def test_address_that_is_not_ray_times_out(tmp_path):
    """A port that accepts TCP but is no Ray GCS: a clear error after --connect-timeout, not a hang."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        conns = []
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass
        accepted.append(len(conns))
        for c in conns:
            c.close()

    accepted = []
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        # the hang guard: Ray alone retries such a port for minutes; 180 s leaves a loaded host the
        # interpreter's and Ray's start-up, which are not what this test is about
        proc = subprocess.run([sys.executable, "-m", "hybrid_ray.cli", "run", "--address", f"127.0.0.1:{port}",
                               "--connect-timeout", "3", "--limit", "5", "--no-progress"],
                              capture_output=True, text=True, timeout=180)
    finally:
        stop.set()
        t.join()
        srv.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hybrid-ray: error:" in proc.stderr and "no Ray cluster answered within 3 s" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert accepted and accepted[0] >= 1      # the TCP probe got through: ray.init was what timed out


# -- slow: the embedded default from a shell, and the load benchmark -------------------------------

@pytest.mark.slow
def test_default_run_from_a_shell_is_quick(tmp_path):
    out = tmp_path / "m.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hybrid_ray.cli", "run", "--json", str(out)], capture_output=True,
                          text=True, timeout=120)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert wall < 60
    data = json.loads(out.read_text())
    assert data["requests_completed"] == data["requests_total"] == 1319
    cluster, requests = load_inputs()
    sim = simulate(cluster, build_scheduler("baseline", cluster, requests), requests)
    assert data["makespan_s"] == pytest.approx(sim.makespan_s, rel=0.05)
    assert "run: 1319/1319 done" in proc.stderr          # the progress line


@pytest.mark.slow
@pytest.mark.ray
def test_load_20k_requests_16_replicas(ray_session):
    from hybrid_ray.bench.load import load_cluster_x, load_requests, run_load

    fig = run_load(20_000, 16, rate=400.0, time_scale=1.0, progress=False)
    assert fig["completed"] == 20_000 and fig["failed_replicas"] == 0
    assert fig["controller_decision_p99_s"] < 0.005
    assert fig["messages_per_request"] < 5
    cluster, requests = load_cluster_x(16, 1.0), load_requests(20_000, 400.0)
    sim = simulate(cluster, build_scheduler("baseline", cluster, requests), requests)
    assert fig["makespan_s"] == pytest.approx(sim.makespan_s, rel=0.05)
    assert fig["late_mean_s"] < 0.01 * fig["makespan_s"]   # the controller kept up: adds arrive in time
