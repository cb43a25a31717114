"""The controller actor is no single point of failure: killed or stopped mid-run, it is replaced.

In-process first (no Ray): replicas fence off an older controller generation and report what they
hold; a rebuilt controller books it. Then on Ray, through ``hybrid-ray run`` itself: the
controller's process gets SIGKILL or SIGSTOP at a counted point of the run (the driver's
completion hook), and the run still ends with exit 0 and every request id exactly once, with no
traceback; beyond the restarts it stops with the resume hint, and ``--resume`` completes it.
"""
from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import signal
import time
from contextlib import contextmanager

import pytest

from hybrid_ray.actors import driver as driver_mod
from hybrid_ray.actors.controller import ControllerActor
from hybrid_ray.actors.replica import ReplicaActor
from hybrid_ray.cli import main
from hybrid_ray.inputs import load_inputs
from hybrid_ray.planning import build_scheduler
from hybrid_ray.results import read_results

N = 200
GAP_S = 0.3              # modelled seconds between arrivals: routing is needed all along the run
TIME_SCALE = 0.1         # 60 modelled seconds of arrivals = 6 s of real time
KILL_AT = 40             # completions before the controller is signalled


# -- in-process: fencing and rebuilt books --------------------------------------------------------

def test_replica_fences_off_an_older_controller_and_reports_what_it_holds():
    cluster, requests = load_inputs("paper_llama65b", "gsm8k", 12)
    sch = build_scheduler("baseline", cluster, requests)

    async def go():
        a = ReplicaActor(cluster.replicas()[0], sch.policy_factory, 1.0)
        await a.add([sch.make_sequence(q) for q in requests[:6]], tag=4, gen=0)
        report, held = await a.set_controller("new-controller", 1)
        assert (a.controller, a.gen, a.tag) == ("new-controller", 1, 0)
        assert sorted(held) == sorted(q.id for q in requests[:6]) and report.waiting == 6
        assert await a.add([sch.make_sequence(q) for q in requests[6:9]], tag=9, gen=0) == -1   # stale: refused
        assert await a.take_back(3, tag=9, gen=0) == []
        assert a.stats.fenced == 3 and a.report().waiting == 6 and a.tag == 0
        assert await a.add([sch.make_sequence(q) for q in requests[6:9]], tag=1, gen=1) == 9
        await a.set_controller("old-controller", 0)          # an older generation cannot take over again
        assert a.controller == "new-controller"

    asyncio.run(go())


def test_rebuilt_controller_books_what_the_replicas_hold():
    cluster, requests = load_inputs("paper_llama65b", "gsm8k", 12)
    sch = build_scheduler("raydata", cluster, requests)
    ctrl = ControllerActor(cluster, sch.router, sch.controller, [None] * 4, 1.0, dispatcher=sch.dispatcher,
                           generation=2)
    rep = ReplicaActor(cluster.replicas()[1], sch.policy_factory, 1.0).report()

    async def go():
        await ctrl.rebuild({1: (rep, ["a", "b"]), 3: (rep, ["c"])}, [0, 2], None, 0.0, routed=7)
        assert await ctrl.replica_failed(1) == ["a", "b"]

    asyncio.run(go())
    assert ctrl.dead == {0, 1, 2} and ctrl.gen == 2 and ctrl.reports[3] == rep
    assert ctrl.dispatcher.seen == 7         # arrivals it never saw: its last partial block is still cut


# -- on Ray: the CLI run, the controller's process signalled -------------------------------------

@contextmanager
def _hang_guard(seconds: float = 240):
    """A regression that hangs fails the session with a stack dump instead of hanging it."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _workload(path, n: int = N, gap_s: float = GAP_S) -> list[str]:
    _, requests = load_inputs("paper_llama65b", "gsm8k", n)
    with open(path, "w") as fh:
        for k, q in enumerate(requests):
            fh.write(json.dumps({"id": q.id, "prompt_tokens": q.prompt_tokens, "output_tokens": q.output_tokens,
                                 "arrival_s": k * gap_s}) + "\n")
    return [q.id for q in requests]


def _signal_controller(monkeypatch, sig: int, at: int = KILL_AT) -> dict:
    """Make every run's driver signal its controller's process once ``at`` requests have finished."""
    seen: dict = {}
    init = driver_mod.Driver.__init__

    def hook(d):
        if "pid" not in seen and d.done >= at:
            seen.update(pid=d.controller_pid, done=d.done)
            os.kill(d.controller_pid, sig)

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.hook = hook

    monkeypatch.setattr(driver_mod.Driver, "__init__", patched)
    return seen


def _cont(pid: int | None) -> None:
    if pid is not None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass                   # killed by the driver's replacement, as it should be


def _run_args(tmp_path, policy: str, out, *extra: str, heartbeat: float = 10) -> list[str]:
    """A killed actor is seen at once; only a stopped one waits out ``heartbeat`` (seconds)."""
    return ["run", "--config", "paper_llama65b", "--cpus-per-replica", "1", "--workload", str(tmp_path / "wl.jsonl"),
            "--policy", policy, "--plan-method", "lpt", "--time-scale", str(TIME_SCALE),
            "--heartbeat-timeout", str(heartbeat),
            "--no-progress", "--json", str(tmp_path / "m.json"), *(["-o", str(out)] if out else []), *extra]


def _ids_once(path, expected):
    res = read_results(path)
    assert res.duplicates == [], f"duplicates in {path}: {res.duplicates[:5]}"
    assert res.ids == set(expected)


@pytest.mark.ray
@pytest.mark.parametrize("policy, sig", [
    pytest.param("baseline", signal.SIGKILL, id="baseline-SIGKILL"),
    pytest.param("raydata", signal.SIGKILL, id="raydata-SIGKILL"),   # the dispatcher's held-back blocks go with it
    pytest.param("hybrid", signal.SIGSTOP, id="hybrid-SIGSTOP"),     # plan + moves; hung: seen by its heartbeat
])
def test_controller_signalled_mid_run(ray_session, tmp_path, monkeypatch, capfd, caplog, policy, sig):
    ids = _workload(tmp_path / "wl.jsonl")
    out = tmp_path / "out.jsonl"
    seen = _signal_controller(monkeypatch, sig)
    try:
        with _hang_guard():
            rc = main(_run_args(tmp_path, policy, out, heartbeat=2 if sig == signal.SIGSTOP else 10))
    finally:
        _cont(seen.get("pid"))
    err = capfd.readouterr().err
    assert rc == 0, err[-3000:]
    assert seen["done"] < N                              # signalled mid-run
    _ids_once(out, ids)
    data = json.loads((tmp_path / "m.json").read_text())
    # >= 1: a host loaded past the short heartbeat timeout may replace one more (the run is no less exact)
    assert data["requests_completed"] == N and data["controller_restarts"] >= 1
    assert "Traceback" not in err
    why = "no answer for 2 s" if sig == signal.SIGSTOP else "actor died"
    assert f"controller actor failed ({why}" in caplog.text and "restart 1 of at most 3" in caplog.text


@pytest.mark.ray
def test_controller_lost_beyond_its_restarts_stops_with_the_resume_hint(ray_session, tmp_path, monkeypatch, capfd):
    ids = _workload(tmp_path / "wl.jsonl")
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(driver_mod, "MAX_CONTROLLER_RESTARTS", 0)
    _signal_controller(monkeypatch, signal.SIGKILL)
    with _hang_guard():
        rc = main(_run_args(tmp_path, "baseline", out))
    err = capfd.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("hybrid-ray: error:")]
    assert len(lines) == 1, err[-3000:]
    assert "controller actor failed 1 time (actor died" in lines[0] and "0 restarts allowed" in lines[0]
    assert lines[0].endswith(f"rerun with --resume {out}")
    assert "Traceback" not in err
    finished = read_results(out).ids
    assert KILL_AT <= len(finished) < N
    unfinished = open(f"{out}.unfinished.txt").read().split()
    assert set(unfinished) == set(ids) - finished

    monkeypatch.undo()                                   # no more signals, the usual restarts
    with _hang_guard():
        rc = main(_run_args(tmp_path, "baseline", None, "--resume", str(out)))
    err = capfd.readouterr().err
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    _ids_once(out, ids)
    assert json.loads((tmp_path / "m.json").read_text())["resumed_skipped"] == len(finished)


@pytest.mark.ray
def test_controller_killed_after_the_last_request_finished(ray_session, tmp_path, monkeypatch, capfd):
    """The issue's case: every request done, then an ActorDiedError traceback from collecting stats."""
    ids = _workload(tmp_path / "wl.jsonl", n=40, gap_s=0.0)
    out = tmp_path / "out.jsonl"
    seen = _signal_controller(monkeypatch, signal.SIGKILL, at=40)
    with _hang_guard():
        rc = main(_run_args(tmp_path, "baseline", out))
    err = capfd.readouterr().err
    assert rc == 0 and seen["done"] == 40, err[-3000:]
    _ids_once(out, ids)
    assert "Traceback" not in err
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["requests_completed"] == 40 and data["controller_restarts"] == 0


@pytest.mark.ray
def test_a_slow_controller_start_fails_no_replica(ray_session, tmp_path, monkeypatch, capfd):
    """Starting the new controller takes longer than the replicas' heartbeat timeout (as on a host
    kept busy by other processes). The driver polls no replica meanwhile, so their heartbeat
    windows restart when it is done: no replica is declared lost for the driver's own wait."""
    ids = _workload(tmp_path / "wl.jsonl")
    out = tmp_path / "out.jsonl"
    seen = _signal_controller(monkeypatch, signal.SIGKILL)
    new = driver_mod.Driver._new_controller

    def slow(self, gen):
        if gen:
            time.sleep(3.0)                              # > poll wait + the 1 s heartbeat timeout below
        return new(self, gen)

    monkeypatch.setattr(driver_mod.Driver, "_new_controller", slow)
    # the death is seen by a route call's answer, after this loop round collected the replicas'
    # answers (the ping would see it first, at the top of the round, more often than not)
    monkeypatch.setattr(driver_mod.Driver, "_check_controller", lambda self, now: False)
    with _hang_guard():
        rc = main(_run_args(tmp_path, "baseline", out, heartbeat=1))
    err = capfd.readouterr().err
    assert rc == 0, err[-3000:]
    assert seen["done"] < N                              # signalled mid-run
    _ids_once(out, ids)
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["controller_restarts"] == 1 and data["failed_replicas"] == 0
