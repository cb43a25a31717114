"""Reach Ray and check that it can host the replicas: ``connect_ray``, resources, placement checks.

Ray is imported inside functions, so importing this module (and ``hybrid_ray.runtime``) does not
load Ray.

Process life. ``sigterm_interrupts`` makes SIGTERM raise ``Terminated`` (a ``KeyboardInterrupt``)
during a run, so a terminated driver cleans up and prints the resume hint as on Ctrl-C; Ray's own
handlers (a C++ stack dump, ``sys.exit``) are replaced again right after ``ray.init`` installs
them. A local Ray that ``connect_ray`` starts gets a watchdog process (``watchdog.py``) that
outlives a killed driver and then stops that session's processes, and only those.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from typing import Any

from ..config import ClusterSpec, ReplicaGroupSpec
from ..errors import RuntimeSetupError

LOCAL_REPLICAS_PER_CORE = 8        # emulated replicas only sleep, but each is a process
LOCAL_REPLICAS_MIN = 16            # ... a small machine still hosts this many


class Terminated(KeyboardInterrupt):
    """SIGTERM during a run: unwinds like Ctrl-C (actors killed, Ray stopped); exit 128 + signum."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"signal {signum}")
        self.signum = int(signum)


_sigterm_depth = 0
_received: int | None = None       # the signal that interrupted the run (Ray re-raises it as KeyboardInterrupt)


def _raise_terminated(signum, frame) -> None:
    global _received
    _received = int(signum)
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_interrupts():
    """While active (main thread only), SIGTERM raises ``Terminated``; the previous handler comes back after."""
    global _sigterm_depth, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = signal.signal(signal.SIGTERM, _raise_terminated)
    _sigterm_depth += 1
    _received = None
    try:
        yield
    except KeyboardInterrupt as e:
        if _received is not None and not isinstance(e, Terminated):   # Ray's ray.get / ray.wait re-raise it
            raise Terminated(_received) from None
        raise
    finally:
        _sigterm_depth -= 1
        signal.signal(signal.SIGTERM, prev)


def _reclaim_sigterm() -> None:
    """``ray.init`` installs its own SIGTERM handlers (Python's and a C++ one that dumps stacks)."""
    if _sigterm_depth and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


_watchdog: subprocess.Popen | None = None


def _start_watchdog() -> None:
    """Start the process that stops this local Ray session's processes once this driver is gone."""
    global _watchdog
    try:
        import ray
        session_dir = ray._private.worker._global_node.get_session_dir_path()
    except Exception:                  # noqa: BLE001 -- a Ray without it: no watchdog
        return
    if not os.path.isdir("/proc") or not session_dir:
        return
    from . import watchdog

    _watchdog = subprocess.Popen([sys.executable, watchdog.__file__, str(os.getpid()), session_dir],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)   # a terminal's Ctrl-C or a killed group spares it


def shutdown_ray() -> None:
    """``ray.shutdown()``, then let the watchdog sweep what the session left behind (and exit)."""
    global _watchdog
    import ray

    try:
        ray.shutdown()
    finally:
        w, _watchdog = _watchdog, None
        if w is not None:
            with contextlib.suppress(OSError):
                w.stdin.close()        # EOF: the driver is done (a killed driver closes it too)


def _split_host_port(address: str) -> tuple[str, int]:
    rest = address.removeprefix("ray://")
    default = 10001 if address.startswith("ray://") else 6379
    host, sep, port = rest.rpartition(":")
    if not sep:
        return rest, default
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise RuntimeSetupError(f"--address {address!r}: port {port!r} is not a number") from None


def _is_local(address: str | None) -> bool:
    return address in (None, "", "local")


def effective_address(address: str | None) -> str | None:
    """No address inside a Ray job (``RAY_ADDRESS`` set, as `ray job submit` does) means the job's cluster."""
    if address in (None, "") and os.environ.get("RAY_ADDRESS"):
        return "auto"
    return address


def describe_address(address: str | None) -> str:
    """Where a run goes, for its first line."""
    eff = effective_address(address)
    if _is_local(eff):
        return "local"
    return "the job's cluster via RAY_ADDRESS" if eff != address else eff


def connect_ray(address: str | None, num_cpus: int | None = None, timeout_s: float = 15.0) -> bool:
    """Start a local Ray (address None/"local") or connect; True if this call initialised Ray.

    With no address inside a Ray job (``RAY_ADDRESS`` set), it joins the job's cluster.
    Never hangs: a host:port is probed over TCP first, and ``ray.init`` gets ``timeout_s``
    (it otherwise retries an unreachable GCS for minutes).
    """
    import ray

    address = effective_address(address)
    local = _is_local(address)
    if not local and address.startswith(("http://", "https://")):
        raise RuntimeSetupError(
            f"--address {address}: that is a dashboard / job-submission address; submit with "
            f"`ray job submit --address {address} -- hybrid-ray run --address auto ...`, or give the "
            f"GCS address (HEAD:6379) or a Ray Client address (ray://HEAD:10001)")
    if not local and address != "auto":
        host, port = _split_host_port(address)
        try:
            socket.create_connection((host, port), timeout=min(5.0, timeout_s)).close()
        except OSError as e:
            raise RuntimeSetupError(
                f"--address {address}: cannot reach {host}:{port} ({e.strerror or e}); start a cluster "
                f"with `ray start --head` (or `ray up`), or check the address") from None
    if ray.is_initialized():
        return False
    if local:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        _reclaim_sigterm()
        _start_watchdog()
        return True
    box: dict[str, BaseException | bool] = {}

    def _init() -> None:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
            box["ok"] = True
        except BaseException as e:   # noqa: BLE001 -- reported to the caller below
            box["error"] = e

    thread = threading.Thread(target=_init, name="hybrid-ray-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RuntimeSetupError(
            f"--address {address}: no Ray cluster answered within {timeout_s:.0f} s; give the head's GCS "
            f"address (HEAD:6379), a Ray Client address (ray://HEAD:10001), or `auto` on a cluster node; "
            f"if the cluster uses token authentication, set RAY_AUTH_MODE=token (token in ~/.ray/auth_token)")
    if "error" in box:
        e = box["error"]
        raise RuntimeSetupError(f"--address {address}: cannot connect to Ray: {e}") from None
    _reclaim_sigterm()
    return True


def will_start_local(address: str | None) -> bool:
    """Whether ``connect_ray(address)`` would start a local Ray (and not join one)."""
    if not _is_local(effective_address(address)):
        return False
    import ray

    return not ray.is_initialized()


def check_local_capacity(cluster: ClusterSpec, per_replica: dict[str, dict[str, float]], cores: int,
                         real_engine: bool) -> None:
    """Fail before starting a local Ray that could not host the replicas: real engines need their CPUs
    on this machine's cores; emulated replicas only sleep, but each is a process, so at most
    ``LOCAL_REPLICAS_PER_CORE`` per core (and as many CPUs), at least ``LOCAL_REPLICAS_MIN``."""
    count = sum(g.count for g in cluster.groups)
    cpus = sum(per_replica[g.name].get("CPU", 0) * g.count for g in cluster.groups)
    shape = " + ".join(f"'{g.name}' {g.count} x {fmt_amount(per_replica[g.name].get('CPU', 0))} CPU"
                       for g in cluster.groups)
    fix = "lower the groups' count, pass --cpus-per-replica X, or --address a Ray cluster that has the CPUs"
    if real_engine:
        if cpus > cores + 1e-9:
            raise RuntimeSetupError(
                f"{cluster.source}: {shape} = {fmt_amount(cpus)} CPU for real engines, but this machine has "
                f"{cores} cores; {fix}")
        return
    limit = max(LOCAL_REPLICAS_MIN, LOCAL_REPLICAS_PER_CORE * cores)
    if count > limit or cpus > limit + 1e-9:
        what = f"{count} replicas" if count > limit else f"{fmt_amount(cpus)} CPU"
        raise RuntimeSetupError(
            f"{cluster.source}: {shape} = {what}, too many for a local Ray on this machine: its {cores} cores "
            f"host at most {limit} emulated replicas and {limit} CPU ({LOCAL_REPLICAS_PER_CORE} per core; each "
            f"replica is a process); {fix}")


def group_resources(cluster: ClusterSpec, cpus_per_replica: float | None) -> dict[str, dict[str, float]]:
    """Ray resources of one replica actor, by group (the YAML's, or ``{CPU: x}`` when overridden)."""
    if cpus_per_replica is not None:
        return {g.name: {"CPU": float(cpus_per_replica)} for g in cluster.groups}
    return {g.name: {k: float(v) for k, v in g.resources.items()} for g in cluster.groups}


def actor_options(res: dict[str, float]) -> dict:
    """Ray ``.options(...)`` for a resource mapping: CPU, GPU, memory, and custom resources."""
    opts: dict[str, Any] = {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0)}
    if "memory" in res:
        opts["memory"] = res["memory"]
    custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory")}
    if custom:
        opts["resources"] = custom
    return opts


def fmt_amount(x: float) -> str:
    return f"{x:g}"


def describe_resources(resources: dict) -> str:
    keep = {k: v for k, v in resources.items()
            if not k.startswith(("node:", "object_store_memory", "memory", "accelerator_type"))}
    return ", ".join(f"{k} {fmt_amount(v)}" for k, v in sorted(keep.items())) or "nothing"


def check_resources(groups: tuple[ReplicaGroupSpec, ...], per_replica: dict[str, dict[str, float]],
                    total: dict, nodes: list[dict], source: str | None = None) -> None:
    """Fail before creating actors if the cluster cannot host every replica.

    Two checks: each group's per-replica request fits on some node, and the sum over all
    replicas fits the cluster's totals (Ray would otherwise leave actors pending forever).
    """
    where = f"{source}: " if source else ""
    hint = ("pass --cpus-per-replica X to emulate the replicas on CPUs, or --address a cluster that has it "
            "(an autoscaling cluster may need its workers started first)")
    for g in groups:
        for key, amount in per_replica[g.name].items():
            if amount <= 0:
                continue
            if not any(n.get(key, 0) >= amount for n in nodes):
                largest = max((n.get(key, 0) for n in nodes), default=0)
                raise RuntimeSetupError(
                    f"{where}group '{g.name}' asks for {fmt_amount(amount)} {key} per replica, but no node of the Ray cluster "
                    f"has that much (largest node: {fmt_amount(largest)} {key}; cluster has {describe_resources(total)}); {hint}")
    demand: Counter = Counter()
    users: dict[str, list[str]] = {}
    for g in groups:
        for key, amount in per_replica[g.name].items():
            if amount > 0:
                demand[key] += amount * g.count
                users.setdefault(key, []).append(f"'{g.name}' {g.count} x {fmt_amount(amount)}")
    for key, need in demand.items():
        have = float(total.get(key, 0))
        if have + 1e-9 < need:
            raise RuntimeSetupError(
                f"{where}group {' + '.join(users[key])} {key} = {fmt_amount(need)} {key} needed, but the Ray cluster has "
                f"{fmt_amount(have)} {key} (cluster has {describe_resources(total)}); {hint}")


def local_cpus(cluster: ClusterSpec, per_replica: dict[str, dict[str, float]]) -> int:
    """Logical CPUs for a local Ray: enough for every replica actor (emulated engines only sleep)."""
    need = sum(per_replica[g.name].get("CPU", 0) * g.count for g in cluster.groups)
    return max(os.cpu_count() or 1, math.ceil(need) + 1)
