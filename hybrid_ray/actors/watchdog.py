"""Stop a local Ray session's processes once the driver that started it is gone (run as a script).

``python watchdog.py DRIVER_PID SESSION_DIR``, started by ``session.connect_ray`` right after it
starts a local Ray, with a pipe as stdin. When the pipe closes (the driver finished and called
``shutdown_ray``, or died, even by SIGKILL), it sweeps: every process other than the driver and
itself whose command line names ``SESSION_DIR`` or that holds a file open under it (gcs, raylet,
the dashboard and runtime-env agents, workers: they all log there) gets SIGTERM, then SIGKILL
after a grace period. Other Ray sessions, with other session directories, are never touched.
Linux only (``/proc``); standard library only, so it starts in milliseconds.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time

GRACE_S = 3.0          # SIGTERM, then SIGKILL after this
SWEEPS = 2             # a dying raylet may still have started a worker during the first one


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _belongs(pid: int, session_dir: str) -> bool:
    """Whether process ``pid`` names ``session_dir`` in its command line or has a file open under it."""
    named = re.compile(re.escape(session_dir.rstrip("/").encode()) + rb"(?=[/\0\"' ,;:]|$)")   # not a longer name
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if named.search(fh.read()):
                return True
        prefix = session_dir.rstrip("/") + "/"
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def session_processes(session_dir: str, exclude: set[int]) -> list[int]:
    """Live processes of one Ray session (by its directory), leaving out ``exclude``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid not in exclude and _alive(pid) and _belongs(pid, session_dir):
            out.append(pid)
    return out


def sweep(session_dir: str, exclude: set[int], grace_s: float = GRACE_S) -> int:
    """SIGTERM the session's processes, SIGKILL those left after ``grace_s``; returns how many were found."""
    found = 0
    for _ in range(SWEEPS):
        pids = session_processes(session_dir, exclude)
        if not pids:
            break
        found += len(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    return found


def main(argv: list[str]) -> int:
    driver, session_dir = int(argv[0]), argv[1]
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)      # only the pipe tells it when
    try:
        while sys.stdin.buffer.read(4096):      # blocks until the driver closes it or dies
            pass
    except OSError:
        pass
    if os.path.isdir("/proc") and os.path.isdir(session_dir):
        sweep(session_dir, {driver, os.getpid()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
