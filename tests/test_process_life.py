"""Clean process life: SIGTERM is handled like Ctrl-C, and a dead driver leaves no Ray processes.

The watchdog's sweep is tested on plain processes (no Ray); the rest runs ``hybrid-ray run`` as a
subprocess that starts its own local Ray, signalled once its output file shows it is mid-run.
A session's processes are found by its session directory (what ``watchdog.session_processes``
looks for) and by descent from the driver, never by name: other Ray clusters on this machine are
left alone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybrid_ray.actors import watchdog
from hybrid_ray.inputs import load_inputs
from hybrid_ray.results import read_results

LIMIT = 200
RUN = [sys.executable, "-m", "hybrid_ray.cli", "run", "--config", "paper_llama65b", "--cpus-per-replica", "1",
       "--limit", str(LIMIT), "--no-progress"]


def _alive(pid: int) -> bool:
    return watchdog._alive(pid)


def _wait(cond, timeout_s: float, step_s: float = 0.2) -> bool:
    """Poll ``cond`` until true or ``timeout_s`` (a bound for a loaded host, not a timing assert)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step_s)
    return cond()


def _lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _session_dir(driver: int) -> str:
    """The Ray session directory of a driver's local cluster, from its raylet's command line."""
    for pid in _descendants(driver):
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
        except OSError:
            continue
        for a in args:
            if a.startswith(("--session_dir=", "--session-dir=")):
                return a.split("=", 1)[1]
    raise AssertionError(f"no Ray session directory among the processes of driver {driver}")


def _start_mid_run(tmp_path: Path, out: Path, time_scale: str) -> subprocess.Popen:
    proc = subprocess.Popen(RUN + ["--time-scale", time_scale, "-o", str(out)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not _wait(lambda: _lines(out) >= 20 or proc.poll() is not None, 120):
        proc.kill()
        pytest.fail("the run did not get going")
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    return proc


# -- the watchdog's sweep, on plain processes -----------------------------------------------------

def test_sweep_stops_only_the_sessions_processes(tmp_path):
    mine, other = tmp_path / "session_a", tmp_path / "session_b"
    for d in (mine, other):
        (d / "logs").mkdir(parents=True)
    hold = ("import signal, sys, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN) if sys.argv[2] == 'stubborn' else None; "
            "f = open(sys.argv[1], 'w'); time.sleep(120)")
    procs = {
        # relative log paths: only the open file tells these three apart (as a Ray agent's logs do)
        "by_file": subprocess.Popen([sys.executable, "-c", hold, "a.log", "polite"], cwd=mine / "logs"),
        "stubborn": subprocess.Popen([sys.executable, "-c", hold, "b.log", "stubborn"], cwd=mine / "logs"),
        "by_args": subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", f"--session-dir={mine}"]),
        "other": subprocess.Popen([sys.executable, "-c", hold, "c.log", "polite"], cwd=other / "logs"),
    }
    try:
        assert _wait(lambda: len(watchdog.session_processes(str(mine), {os.getpid()})) == 3, 30)
        found = watchdog.sweep(str(mine), {os.getpid()}, grace_s=0.5)
        assert found == 3
        for name in ("by_file", "stubborn", "by_args"):
            assert _wait(lambda: procs[name].poll() is not None, 10), name
        assert procs["other"].poll() is None                          # another session's: untouched
        assert procs["stubborn"].returncode == -signal.SIGKILL      # ignored SIGTERM: killed after the grace
        assert procs["by_file"].returncode == -signal.SIGTERM
        assert watchdog.session_processes(str(mine), {os.getpid()}) == []
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


# -- a real run, signalled ------------------------------------------------------------------------

@pytest.mark.ray
def test_sigterm_is_handled_like_ctrl_c_then_resume(tmp_path):
    out = tmp_path / "out.jsonl"
    proc = _start_mid_run(tmp_path, out, "0.3")
    session = _session_dir(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert f"hybrid-ray: terminated; finished requests are in {out}: continue with --resume {out}" in err
    assert "Traceback" not in err and "SIGTERM received" not in err      # no Ray stack dump
    finished = read_results(out).ids
    assert 20 <= len(finished) < LIMIT
    assert _wait(lambda: not watchdog.session_processes(session, {os.getpid()}), 30)   # its Ray stopped too

    res = subprocess.run(RUN + ["--time-scale", "0.02", "--resume", str(out)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rf = read_results(out)
    _, requests = load_inputs("paper_llama65b", "gsm8k", LIMIT)
    assert rf.duplicates == [] and rf.ids == {q.id for q in requests}
    assert f"{len(finished)} requests already in {out}" in res.stdout


@pytest.mark.ray
def test_sigkilled_driver_leaves_no_ray_processes(tmp_path):
    out = tmp_path / "out.jsonl"
    proc = _start_mid_run(tmp_path, out, "0.3")
    session = _session_dir(proc.pid)
    tree = _descendants(proc.pid)
    before = watchdog.session_processes(session, {os.getpid(), proc.pid})
    assert len(before) >= 6                  # gcs, raylet, agents, 4 replicas, the controller ...
    assert set(before) <= tree               # ... all started by this driver
    proc.kill()
    proc.communicate(timeout=60)
    gone = _wait(lambda: not any(_alive(p) for p in tree) and not watchdog.session_processes(session, {os.getpid()}),
                 60)
    left = [(p, open(f"/proc/{p}/cmdline", "rb").read()[:80]) for p in tree if _alive(p)]
    assert gone, f"left behind: {left}"
