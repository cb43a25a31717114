"""vLLM's automatic prefix cache, reduced to what scheduling needs: which blocks a prompt can skip.

vLLM (v1, ``vllm/v1/core/kv_cache_utils.py``, ``block_pool.py``) keys every *full* KV block by a hash
chained over all the tokens before it, so a block is reused only when the whole prefix up to it
agrees. A block in use has a reference count; when the last user leaves, the block stays cached
but joins a free queue, oldest first, and is evicted when its memory is taken for something else.
A request freeing its blocks queues its last block first (``free_blocks(reversed(...))``), so a
prefix outlives its tails. ``PrefixCache`` keeps that state: reference counts and the free queue
(LRU) of cached blocks; the replica (``replica.ReplicaState``) owns the token accounting around it
and evicts only when its KV needs the room. (vLLM's free queue also holds the uncached blocks a
request freed, in the same order, and allocates from its head, so it may reuse an old cached block
while newer uncached ones are free; here uncached free memory goes first.)

Requests carry no tokens here: a prefix trace gives one id per ``HASH_BLOCK_TOKENS`` = 512 tokens of
the prompt (Mooncake's ``hash_ids``), and two prompts agree up to a 512-block when their ids agree
up to it. ``block_keys`` turns those ids into keys of the engine's smaller blocks: engine block
``b`` (tokens ``[b*bs, (b+1)*bs)``) is cacheable when it is full and inside the prompt, and its key
is the chain of ids up to the 512-block holding its last token, plus ``b``. Keys are plain ints
(Python's tuple hash of ints, which PYTHONHASHSEED does not salt), so runs are deterministic.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from itertools import takewhile

HASH_BLOCK_TOKENS = 512          # tokens per ``hash_ids`` entry (the public prefix-trace convention)
_ROOT = 0x9E3779B97F4A7C15       # the chain's seed (any constant)
_INDEX_BITS = 32                 # key = chain << 32 | block index: distinct chains never share a key

# one counter for every cache: a (cache state, version) pair is never reused, so a memo keyed by the
# version stays valid even for a sequence that moved between replicas
_VERSIONS = itertools.count(1)


def chain_hashes(hash_ids: Sequence[int]) -> list[int]:
    """``out[j]``: the hash of ``hash_ids[0..j]`` (equal chains give equal hashes)."""
    out, h = [], _ROOT
    for x in hash_ids:
        h = hash((h, x))
        out.append(h)
    return out


def shared_depths(key_lists: Sequence[Sequence[int]]) -> list[int]:
    """For each list of chained keys, how many of its leading keys another list holds too: the
    depth of the prefix it shares (chained keys: a shared key means a shared prefix up to it)."""
    seen: dict[int, int] = {}
    for ks in key_lists:
        for k in ks:
            seen[k] = seen.get(k, 0) + 1
    return [sum(1 for _ in takewhile(lambda k: seen[k] > 1, ks)) for ks in key_lists]


def block_keys(hash_ids: Sequence[int] | None, prompt_tokens: int, block_size: int) -> tuple[int, ...]:
    """Keys of a prompt's cacheable engine blocks, in order: block ``b`` is full, inside the prompt
    and covered by ``hash_ids`` (the 512-block of its last token has an id). Two prompts share block
    ``b`` iff their ids agree up to that 512-block. Empty without ids."""
    if not hash_ids or block_size < 1:
        return ()
    n = min(prompt_tokens, len(hash_ids) * HASH_BLOCK_TOKENS) // block_size
    if n >= 1 << _INDEX_BITS:
        raise ValueError(f"a prompt of {prompt_tokens} tokens has too many {block_size}-token blocks")
    chains = chain_hashes(hash_ids)
    keys = []
    b = 0
    for j, c in enumerate(chains):
        # blocks whose last token (b+1)*bs - 1 lies in 512-block j
        end = min(n, ((j + 1) * HASH_BLOCK_TOKENS) // block_size)
        if end > b:
            base = c << _INDEX_BITS               # low bits zero: base + k == base | k
            keys.extend(range(base + b, base + end))
            b = end
        if b >= n:
            break
    return tuple(keys)


class PrefixCache:
    """Cached blocks by key, with reference counts and an LRU queue of the free (unreferenced) ones.

    ``capacity_blocks`` bounds the blocks it holds (``insert`` evicts the oldest free block when
    full, or declines when none is free); None: no bound of its own, for an owner that evicts when
    its memory needs the room (``evict``), as the replica does, and never in the middle of an
    iteration's admissions. ``version`` changes whenever what ``match`` or ``free_hits`` would answer
    may have.
    """

    __slots__ = ("capacity_blocks", "block_size", "_ref", "_free", "version", "evictions")

    def __init__(self, capacity_blocks: int | None, block_size: int):
        if (capacity_blocks is not None and capacity_blocks < 0) or block_size < 1:
            raise ValueError(f"need capacity_blocks >= 0 and block_size >= 1, got {capacity_blocks}, {block_size}")
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self._ref: dict[int, int] = {}                       # key -> reference count
        self._free: OrderedDict[int, None] = OrderedDict()   # refcount-0 keys, next to evict first
        self.version = next(_VERSIONS)
        self.evictions = 0

    # -- views ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ref)

    def __contains__(self, key: int) -> bool:
        return key in self._ref

    @property
    def free_blocks(self) -> int:
        """Cached blocks nobody references: evictable (vLLM counts them as free memory)."""
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return len(self._ref) - len(self._free)

    def refcount(self, key: int) -> int:
        return self._ref.get(key, 0)

    def lru(self) -> list[int]:
        """The free blocks, next to evict first (for tests and debugging)."""
        return list(self._free)

    # Bulk operations run in C (takewhile, map, comprehensions): a prompt has hundreds of blocks.
    def match(self, keys: Sequence[int], limit: int | None = None) -> int:
        """How many leading ``keys`` (at most ``limit``) are cached."""
        head = keys if limit is None or limit >= len(keys) else keys[:max(limit, 0)]
        return len(list(takewhile(self._ref.__contains__, head)))

    def free_hits(self, keys: Sequence[int], count: int) -> int:
        """Of the first ``count`` keys (all cached), how many are free: acquiring them takes that
        many blocks out of the evictable pool."""
        return list(map(self._ref.__getitem__, keys[:count])).count(0)

    # -- changes --------------------------------------------------------------------------------
    def acquire(self, keys: Sequence[int], count: int) -> int:
        """Reference the first ``count`` keys (cached: ``match``); returns how many were free."""
        ks = keys[:count]
        ref = self._ref
        counts = [ref[k] + 1 for k in ks]
        was_free = [k for k, r in zip(ks, counts) if r == 1]
        ref.update(zip(ks, counts))
        if was_free:
            free = self._free
            for k in was_free:
                del free[k]
            self.version = next(_VERSIONS)
        return len(was_free)

    def insert(self, key: int) -> bool:
        """Cache a block just computed, referenced once by its computer; False (nothing changes) if
        ``key`` is cached already (the computer keeps its copy private) or the cache is full of
        referenced blocks."""
        return self.insert_run((key,), 0, 1) == 1

    def insert_run(self, keys: Sequence[int], start: int, stop: int) -> int:
        """``insert`` ``keys[start:stop]`` in order, up to the first one it declines; returns how many
        it cached."""
        ref, cap = self._ref, self.capacity_blocks
        run = keys[start:stop]
        if (cap is None or len(ref) + len(run) <= cap) and ref.keys().isdisjoint(run):   # usually: all new
            ref.update(dict.fromkeys(run, 1))
            if run:
                self.version = next(_VERSIONS)
            return len(run)
        i = start
        while i < stop:
            k = keys[i]
            if k in ref or (cap is not None and len(ref) >= cap and not self.evict(1)):
                break
            ref[k] = 1
            i += 1
        if i > start:
            self.version = next(_VERSIONS)
        return i - start

    def release(self, keys: Sequence[int], count: int) -> int:
        """Drop one reference from each of the first ``count`` keys; returns how many became free.
        They join the free queue last block first, so a prompt's tail is evicted before its prefix."""
        ks = keys[:count]
        ref = self._ref
        counts = [ref[k] - 1 for k in ks]
        ref.update(zip(ks, counts))
        if 0 not in counts:
            return 0
        freed = [k for k, r in zip(reversed(ks), reversed(counts)) if not r]
        self._free.update(dict.fromkeys(freed))
        self.version = next(_VERSIONS)
        return len(freed)

    def evict(self, blocks: int) -> int:
        """Evict up to ``blocks`` free blocks, least recently freed first; returns how many."""
        ref, free = self._ref, self._free
        n = min(blocks, len(free))
        pop = free.popitem
        for _ in range(n):
            del ref[pop(last=False)[0]]
        if n:
            self.evictions += n
            self.version = next(_VERSIONS)
        return n

    def clear(self) -> None:
        """Forget everything (the engine holding the blocks is gone)."""
        self._ref.clear()
        self._free.clear()
        self.version = next(_VERSIONS)
