"""Load and check what every command needs: the cluster and the requests."""
from __future__ import annotations

from .config import ClusterSpec, load_cluster
from .workload import Request, check_feasible, load_workload

DEFAULT_CONFIG = "local"
DEFAULT_WORKLOAD = "gsm8k"


def load_inputs(config: str = DEFAULT_CONFIG, workload: str = DEFAULT_WORKLOAD, limit: int | None = None,
                seed: int | None = None, tokenizer=None) -> tuple[ClusterSpec, list[Request]]:
    """Cluster + requests, with every request checked to fit some replica before anything runs.

    An OpenAI batch file (``openai_batch.py``) gives its valid lines; the others are logged, not fatal.
    ``tokenizer``: counts the prompt text of workload lines without prompt_tokens (``tokens.py``).
    """
    from .openai_batch import is_batch_workload, load_batch_requests

    if is_batch_workload(workload):
        return load_batch_requests(config, workload, limit, seed)
    cluster = load_cluster(config)
    requests = load_workload(workload, limit=limit, seed=seed, tokenizer=tokenizer)
    check_feasible(requests, [g.kv_capacity_tokens for g in cluster.groups])
    return cluster, requests
