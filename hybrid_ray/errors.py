"""Typed errors a user can cause; the CLI prints their message and exits non-zero (no traceback)."""
from __future__ import annotations


class HybridRayError(Exception):
    """Base class: the message says what to change."""


class UsageError(HybridRayError):
    """A command-line option is out of range or conflicts with another; the message names the option."""


class ConfigError(HybridRayError):
    """A cluster YAML is malformed; the message names the file and the key path."""


class WorkloadError(HybridRayError):
    """A workload file is malformed; the message names the file and the line."""


class InfeasibleRequestError(HybridRayError):
    """A request can never run on any replica (e.g. longer than every KV cache)."""

    def __init__(self, message: str, request_ids: list[str]):
        super().__init__(message)
        self.request_ids = request_ids


class RuntimeSetupError(HybridRayError):
    """Ray could not be started or reached, or the cluster cannot host the replicas."""


class ReplicasLostError(HybridRayError):
    """Every replica failed; ``unfinished`` lists the request ids left, also written to ``path``."""

    def __init__(self, message: str, unfinished: list[str], path: str):
        super().__init__(message)
        self.unfinished = unfinished
        self.path = path


class HistoryError(HybridRayError):
    """A ``--history`` file is missing or malformed; the message names the file."""


class ControllerLostError(HybridRayError):
    """The controller actor kept failing (beyond the run's restarts); the message gives the resume hint."""


def one_line(text: object) -> str:
    """``text`` on one line (newlines and runs of whitespace become one space): user errors print one line."""
    return " ".join(str(text).split())
