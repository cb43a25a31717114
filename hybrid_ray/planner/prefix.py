"""Prefix-aware assignment: requests that share a prompt prefix packed together, as bin-packing items.

Why: with prefix caching (vLLM's default) a replica computes a shared prefix (a document, a
system prompt, few-shot examples) once and every later request that finds it cached computes
only its own suffix; and the running requests of a group hold the prefix's KV once, so a replica
running one group fills its batch where one running many different prefixes is bound by its KV
cache. A work-balanced plan spreads a group over every replica, and each pays the prefix and
holds its KV. Here a request's group is the deepest prefix of its ``hash_ids`` chain that another
request shares (``prefix_groups``); a group is a bin-packing item whose prefix costs once per
replica it lands on; a group larger than ``SPLIT_SHARE`` of a replica's even share is cut into
chunks (each pays its prefix again: balance needs it); the items are packed longest-first onto the
replica that would finish them first (``prefix_assignment``), and each replica runs its groups one
after another, each group's requests longest output first (``grouped_order``), so that a group runs
while its prefix is cached.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ClusterSpec, ReplicaGroupSpec
from ..prefix_cache import HASH_BLOCK_TOKENS, chain_hashes, shared_depths
from ..workload import Request
from .estimate import decode_share, prefill_alone

SPLIT_SHARE = 0.25        # an item is at most this share of a replica's even share of the work


@dataclass(frozen=True, slots=True)
class PrefixGroups:
    """Per request: its group (-1: it shares nothing) and the prompt tokens the group's prefix covers."""

    group: np.ndarray
    shared: np.ndarray
    count: int


def prefix_groups(requests: list[Request]) -> PrefixGroups | None:
    """Each request's deepest ``hash_ids`` prefix that another request shares; None when no two share one."""
    chains = [chain_hashes(q.hash_ids) if q.hash_ids else [] for q in requests]
    ids: dict[int, int] = {}
    group = np.full(len(requests), -1, dtype=np.int64)
    shared = np.zeros(len(requests), dtype=np.float64)
    for i, (q, ch, d) in enumerate(zip(requests, chains, shared_depths(chains))):
        if d:
            group[i] = ids.setdefault(ch[d - 1], len(ids))
            shared[i] = min(d * HASH_BLOCK_TOKENS, q.prompt_tokens - 1)
    return PrefixGroups(group, shared, len(ids)) if ids else None


def crowding_groups(cluster: ClusterSpec, requests: list[Request]) -> PrefixGroups | None:
    """The batch's prefix groups where the planner packs them: some group of replicas caches
    prefixes, and the distinct shared prefixes do not all fit one replica's cache
    (``prefixes_crowd``; else every replica keeps them all, and the usual cuts apply)."""
    if not any(g.prefix_caching for g in cluster.groups) or not any(q.hash_ids for q in requests):
        return None
    groups = prefix_groups(requests)
    return groups if groups is not None and prefixes_crowd(cluster, groups) else None


def prefixes_crowd(cluster: ClusterSpec, groups: PrefixGroups) -> bool:
    """Whether the groups' distinct prefixes together exceed the smallest replica's KV cache: then a
    replica cannot keep every prefix cached, and where a group runs decides what is recomputed."""
    first = np.unique(groups.group[groups.group >= 0], return_index=True)[1]
    prefix_tokens = float(groups.shared[groups.group >= 0][first].sum())
    return prefix_tokens > min(g.kv_capacity_tokens for g in cluster.groups)


def member_work(g: ReplicaGroupSpec, prompt: np.ndarray, output: np.ndarray, shared: np.ndarray,
                batch: float) -> np.ndarray:
    """A request's seconds on a replica of ``g`` where its group's prefix is cached: its suffix's
    prefill (a continuation: attention over the cached prefix) and its decode share at its whole
    context, in a batch of ``batch``."""
    suffix = np.maximum(prompt - shared, 1.0)
    pre = prefill_alone(g.cost_model, suffix) + g.cost_model.prefill.per_token_sq_s * 2.0 * shared * suffix
    return pre + decode_share(g.cost_model, prompt, output, batch)


def shared_batch(g: ReplicaGroupSpec, prompt: np.ndarray, output: np.ndarray, shared: np.ndarray) -> float:
    """Sequences a replica of ``g`` keeps running when its requests hold their group's prefix once:
    the KV cache over the mean context they hold alone, plus the prefix spread over a full batch."""
    if len(prompt) == 0:
        return float(g.max_batch_size)
    own = float(np.mean(prompt - shared + output / 2.0)) + 1.0
    per = own + float(np.mean(shared)) / g.max_batch_size
    return float(max(1.0, min(g.max_batch_size, g.kv_capacity_tokens / per)))


def prefix_items(cluster: ClusterSpec, prompt: np.ndarray, output: np.ndarray, groups: PrefixGroups
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """The bin-packing items (request indices, longest output first) and their work on each group
    ([groups, items]): a group's chunk pays its prefix's prefill once."""
    gs = cluster.groups
    batch = [shared_batch(g, prompt, output, groups.shared) for g in gs]
    member = np.stack([member_work(g, prompt, output, groups.shared, b) for g, b in zip(gs, batch)])
    alone = np.stack([member_work(g, prompt, output, np.zeros_like(prompt), b) for g, b in zip(gs, batch)])
    # a request alone pays its whole prompt; a group's member only its suffix
    work = np.where(groups.group >= 0, member, alone)
    share = float(work[0].sum()) / max(1, cluster.num_replicas)
    cap = max(SPLIT_SHARE * share, 1e-12)
    items: list[np.ndarray] = []
    for k in range(groups.count):
        idx = np.flatnonzero(groups.group == k)
        idx = idx[np.argsort(-output[idx], kind="stable")]
        total = float(work[0, idx].sum())
        chunks = max(1, int(np.ceil(total / cap)))
        items.extend(c for c in np.array_split(idx, min(chunks, len(idx))) if len(c))
    items.extend(np.array([i]) for i in np.flatnonzero(groups.group < 0))
    prefix_cost = np.stack([prefill_alone(g.cost_model, groups.shared) for g in gs])
    item_work = np.array([[float(work[k, it].sum()) + (float(prefix_cost[k, it[0]]) if groups.group[it[0]] >= 0 else 0.0)
                           for it in items] for k in range(len(gs))])
    return items, item_work


def prefix_assignment(cluster: ClusterSpec, items: list[np.ndarray], item_work: np.ndarray,
                      n: int) -> np.ndarray:
    """Replica index for each of the ``n`` requests: the items (``prefix_items``) longest first, each
    to the replica that would finish it earliest (list scheduling on the items' work)."""
    replicas = cluster.replicas()
    gidx = [{g.name: k for k, g in enumerate(cluster.groups)}[r.group.name] for r in replicas]
    order = np.argsort(-item_work.min(axis=0), kind="stable")
    load = np.zeros(len(replicas))
    assign = np.zeros(n, dtype=np.int64)
    for j in order:
        # the replica that finishes item j earliest: its load plus the item's work on its group
        m = min(range(len(replicas)), key=lambda r: (load[r] + item_work[gidx[r], j], r))
        load[m] += item_work[gidx[m], j]
        assign[items[j]] = m
    return assign


def grouped_order(idx: np.ndarray, groups: PrefixGroups, work: np.ndarray, output: np.ndarray) -> np.ndarray:
    """A replica's start order: its groups one after another, the most work first (each group runs
    while its prefix is cached), each group's requests longest output first; a request that shares
    nothing is a group of its own."""
    if len(idx) == 0:
        return idx
    g = groups.group[idx]
    key = np.where(g >= 0, g, -1 - np.arange(len(idx)))           # singletons: a key each
    uniq, inv = np.unique(key, return_inverse=True)
    total = np.bincount(inv, weights=work[idx], minlength=len(uniq))
    rank = np.argsort(np.argsort(-total, kind="stable"), kind="stable")   # a group's place
    return idx[np.lexsort((idx, -output[idx], rank[inv]))]


def finish_estimates(cluster: ClusterSpec, items: list[np.ndarray], item_work: np.ndarray,
                     assign: np.ndarray) -> np.ndarray:
    """Each replica's estimated finish under ``assign`` (the items' model, an item on its first
    request's replica): for the plan's report."""
    replicas = cluster.replicas()
    gidx = [{g.name: k for k, g in enumerate(cluster.groups)}[r.group.name] for r in replicas]
    out = np.zeros(len(replicas))
    for j, it in enumerate(items):
        m = int(assign[it[0]])
        out[m] += item_work[gidx[m], j]
    return out
