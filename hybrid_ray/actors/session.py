"""Reach Ray and check that it can host the replicas: ``connect_ray``, resources, placement checks.

Ray is imported inside functions, so importing this module (and ``hybrid_ray.runtime``) does not
load Ray.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import threading
from collections import Counter
from typing import Any

from ..config import ClusterSpec, ReplicaGroupSpec
from ..errors import RuntimeSetupError


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
    return True


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
                    total: dict, nodes: list[dict]) -> None:
    """Fail before creating actors if the cluster cannot host every replica.

    Two checks: each group's per-replica request fits on some node, and the sum over all
    replicas fits the cluster's totals (Ray would otherwise leave actors pending forever).
    """
    hint = ("pass --cpus-per-replica X to emulate the replicas on CPUs, or --address a cluster that has it "
            "(an autoscaling cluster may need its workers started first)")
    for g in groups:
        for key, amount in per_replica[g.name].items():
            if amount <= 0:
                continue
            if not any(n.get(key, 0) >= amount for n in nodes):
                largest = max((n.get(key, 0) for n in nodes), default=0)
                raise RuntimeSetupError(
                    f"group '{g.name}' asks for {fmt_amount(amount)} {key} per replica, but no node of the Ray cluster "
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
                f"group {' + '.join(users[key])} {key} = {fmt_amount(need)} {key} needed, but the Ray cluster has "
                f"{fmt_amount(have)} {key} (cluster has {describe_resources(total)}); {hint}")


def local_cpus(cluster: ClusterSpec, per_replica: dict[str, dict[str, float]]) -> int:
    """Logical CPUs for a local Ray: enough for every replica actor (emulated engines only sleep)."""
    need = sum(per_replica[g.name].get("CPU", 0) * g.count for g in cluster.groups)
    return max(os.cpu_count() or 1, math.ceil(need) + 1)
