"""The online iteration rule: insert prefill work now, or keep decoding? (Lagrangian pricing)

Derivation (full version in docs/scheduling.md). A replica must produce a fixed number of
decode tokens; its finish time is the sum of its iteration times. The batch-capacity constraint
(at most B sequences at once) couples the iterations. Relax it with a multiplier lambda >= 0 per
slot per unit time: the Lagrangian charges every empty slot-step its shadow price. At the
optimum of the relaxation, the price of one slot for one decode step is the replica time one
token costs at full occupancy::

    mu = lambda * t_d / B        (t_d = time of the current decode step; lambda = 1 is the exact
                                  shadow price, other values trade latency for batching)

With k slots free now and a queue of waiting prompts, the replica can

* insert them now: a prefill iteration of the k prompts stalls every running sequence for its
  time ``t_p(k)``, or, on engines that mix, piggyback them on the next decode step at extra
  cost ``t_m(k) - t_d``; the prompts' own compute (per-token and attention work) is paid
  whenever they run, so only the rest, the *overhead* ``c(k)`` of the cheaper option, depends on
  the decision (it can be negative: mixing saves the prefill's own weight pass);
* or defer j decode steps, leaving k + n_0 + ... empty slot-steps (n_i = running sequences
  predicted to finish within i steps), and then insert ``k_j = k + n_j`` prompts together.

By the renewal-reward theorem, over a long batch the schedule that minimises the cost *per
admitted request* minimises the total time, so the rule inserts now iff::

    c(k) / k  <=  min_{1<=j<=H}  ( c(k_j) + mu * sum_{i<j} (k + n_i) ) / k_j

With lambda -> infinity it is FCFS prefill-first (never leave a slot empty); with lambda -> 0 it
waits to batch as many prompts as possible. It decides with predicted lengths only.

Start-up (``ramp``). An idle replica facing a queue fills its batch by a *start-up program*
(``startup_program``): the queue's first request, then the shortest of its next prompts, in
groups, each group riding on the decode step of those already in. It trades the prefill's cost
above the decode step against the empty slot-steps (priced at mu each) until the batch is whole,
exactly (a shortest path over how many prompts are in; once per idle start, not before every
iteration: 0.4-0.7 ms at batch 128, ``hybrid-ray bench perf``). One prefill of every prompt stalls
nothing but costs its full per-token price; a trickle fills slowly; the program is the least
total of the two losses.
"""
from __future__ import annotations

import numpy as np

from ..costmodel import CostModel
from ..knobs import RAMPS
from ..replica import DECODE, MIXED, PREFILL, WAITING, Iteration, ReplicaState, Sequence
from .fcfs import admit_in_order



def startup_program(cost: CostModel, prompts: list[int], batch: int, budget: int, mu: float) -> list[int]:
    """Sizes of the prompt groups that fill an idle replica, consecutive in the order of ``prompts``
    (ascending for ramp "shortest", queue order for "plan").

    Group i (prompts n_{i-1}..n_i, ``a`` tokens) costs the replica its prefill beyond one decode
    step, ``max(decode.base, prefill(a)) - decode.base`` (the first group: ``prefill(a) - decode.base``,
    nothing decodes yet), plus ``mu`` per empty slot, ``batch - n_i``. Every token's own decode
    cost is paid whatever the program, so the least sum of those two is the fastest start-up: a
    shortest path over ``n`` (O(N^2), once per idle start). ``budget``: the token budget an
    iteration (its prompts plus one token per decoding sequence) must keep, unless a group is a
    single prompt.
    """
    n = len(prompts)
    if n <= 1:
        return [n] if n else []
    pc, base = cost.prefill, cost.decode.base_s
    q = np.asarray(prompts, dtype=np.float64)
    tok = np.concatenate([[0.0], np.cumsum(q)])
    sq = np.concatenate([[0.0], np.cumsum(q * q)])
    a = tok[None, :] - tok[:, None]                       # a[i, j]: tokens of prompts i..j-1
    pre = np.maximum(pc.floor_s, pc.base_s + pc.per_token_s * a) + pc.per_token_sq_s * (sq[None, :] - sq[:, None])
    step = np.maximum(pre, base) - base
    step[0] = pre[0] - base                                # the first group: a prefill alone
    idx = np.arange(n + 1)
    over = a + idx[:, None] > budget                       # i running + the group's tokens
    over &= idx[None, :] - idx[:, None] > 1
    step[over] = np.inf
    step += mu * (batch - idx)[None, :]
    into = np.ascontiguousarray(step.T)                    # into[j, i]: the group i..j-1, a row per end
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    arg = np.zeros(n + 1, dtype=np.int64)
    v = np.empty(n + 1)
    for j in range(1, n + 1):
        np.add(best[:j], into[j, :j], out=v[:j])
        i = int(v[:j].argmin())
        best[j], arg[j] = v[i], i
    sizes = []
    j = n
    while j > 0:
        sizes.append(int(j - arg[j]))
        j = int(arg[j])
    return sizes[::-1]


def ramp_order(prompts: list[int]) -> list[int]:
    """Positions of an idle replica's admissible queue prefix in the "shortest" start-up order:
    the queue's first request, then the shortest prompts (ties in queue order)."""
    return [0] + sorted(range(1, len(prompts)), key=lambda k: prompts[k])


def ramp_price(cost: CostModel, batch: int, multiplier: float) -> float:
    """mu: the price of one empty slot-step, the decode step's weight pass shared by its slots."""
    return multiplier * cost.decode.base_s / batch


class LagrangianPolicy:
    name = "lagrangian"

    def __init__(self, multiplier: float = 1.0, allow_mixed: bool = True, horizon: int = 32,
                 chunk_tokens: int = 0, ramp: str = "off"):
        if multiplier < 0:
            raise ValueError("multiplier must be >= 0")
        if ramp not in RAMPS:
            raise ValueError(f"unknown ramp {ramp!r}; choose from {', '.join(RAMPS)}")
        self.multiplier = multiplier
        self.allow_mixed = allow_mixed
        self.horizon = horizon
        self.chunk_tokens = chunk_tokens      # > 0: mixed insertions are split into chunks (Sarathi)
        self.ramp = ramp                      # fill an idle replica by a start-up program (RAMPS)
        self._program: list[list[Sequence]] = []    # its groups still to insert, next first
        self.decisions = 0
        self.deferrals = 0
        self._finishing_memo: tuple[ReplicaState, list[int]] | None = None   # lookahead() -> schedule()

    # -- cost of inserting a set of prompts --------------------------------------------------
    def _chunk_limit(self, r: ReplicaState) -> int:
        """Prefill tokens a mixed iteration may carry (chunk size within the token budget)."""
        return min(self.chunk_tokens, r.max_batched_tokens) - len(r.running)

    def _insert_cost(self, r: ReplicaState, tokens: int, attn: int, t_d: float,
                     mixable: bool = True) -> tuple[float, bool]:
        """(overhead, mixed?) of inserting prompts with ``tokens``/``attn`` into this replica.

        The overhead is the insertion's time minus the prompts' own compute (per-token and
        attention work), which is paid whenever they are prefilled: only the fixed part (the
        prefill floor and base, the decode stall, or what mixing saves) depends on *when*.
        Comparing whole costs instead would favour waiting for short prompts. ``mixable`` False:
        the first prompt cannot ride on a decode step (``_chunks`` cuts nothing of it).
        """
        cost = r.cost
        p = cost.prefill
        own = p.per_token_s * tokens + p.per_token_sq_s * attn
        pre = cost.prefill_time(tokens, attn) - own
        if not (self.allow_mixed and r.running and mixable):
            return pre, False
        if self.chunk_tokens > 0:
            limit = self._chunk_limit(r)
            if limit < 1:
                return pre, False
            if tokens > limit:
                tokens, attn = limit, limit * limit          # the first chunk decides
                own = p.per_token_s * tokens + p.per_token_sq_s * attn
        elif tokens + len(r.running) > r.max_batched_tokens:
            return pre, False
        extra = cost.mixed_time(tokens, attn, len(r.running), r.kv_used) - t_d - own
        return (extra, True) if extra < pre else (pre, False)

    def _chunks(self, r: ReplicaState, batch: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Cap a mixed iteration's prefill tokens at the chunk limit (the rest continues later); in
        queue order, up to the first prompt that must be prefilled whole and does not fit
        (``ReplicaState.prefill_chunk``). Empty: the first prompt cannot be mixed in at all."""
        budget = self._chunk_limit(r)
        out = []
        for s, _ in batch:
            n = r.prefill_chunk(s, budget)
            if n <= 0:
                break
            out.append((s, n))
            budget -= n
        return out

    def _continue_chunks(self, r: ReplicaState) -> Iteration | None:
        """Prompts already split over iterations keep going first (they hold slots and KV)."""
        budget = self._chunk_limit(r)
        decode = bool(r.running) and budget >= 1
        if not decode:
            budget = min(max(self.chunk_tokens, 1), r.max_batched_tokens)
        kv_free = r.kv_free - (len(r.running) if decode else 0)
        chunks = []
        for s in r.prefilling.values():
            n = r.prefill_chunk(s, min(budget, kv_free - 1))
            if n <= 0:
                break
            chunks.append((s, n))
            budget -= n
            kv_free -= n + 1
        if not chunks:
            return None
        return Iteration(MIXED if decode else PREFILL, chunks, decode=decode)

    def lookahead(self, r: ReplicaState) -> int:
        """At most how many waiting prompts the next ``schedule(r)`` reads, so that SortedQueue orders
        only those: the free slots, plus one per running sequence predicted to finish within the
        horizon (a deferral inserts that many more). The per-step counts it needs are kept for that
        call, which must come next, on the same state."""
        slots = r.free_slots
        if slots <= 0 or not r.waiting:
            return 0
        if not r.running:
            return slots
        if self._program:
            # the start-up program admits its own sequences wherever they now wait (sequences moved
            # here or re-sorted since can stand before them): it reads the whole queue
            return len(r.waiting)
        finishing = self._finishing(r)
        self._finishing_memo = (r, finishing)
        return slots + sum(finishing)

    def schedule(self, r: ReplicaState) -> Iteration | None:
        memo, self._finishing_memo = self._finishing_memo, None
        running = r.running
        if r.prefilling:
            it = self._continue_chunks(r)
            if it is not None:
                return it
        if not r.waiting or r.free_slots <= 0:
            self._program = []
            return Iteration(DECODE, decode=True) if running else None
        if self._program and running:
            it = self._next_group(r)
            if it is not None:
                return it
        batch = admit_in_order(r, r.waiting)
        if not batch:
            return Iteration(DECODE, decode=True) if running else None
        if not running:
            # the program prices an empty slot-step at mu, the capacity it costs: true when later
            # requests will fill the slots; with no more requests than slots, a late start only
            # delays its request
            if self.ramp != "off" and not r.prefilling and len(r.waiting) > r.max_batch and len(batch) > 1:
                return self._start(r, batch)
            return Iteration(PREFILL, batch, decode=False)        # nothing to stall
        self.decisions += 1
        t_d = r.cost.decode_time(len(running), r.kv_used)
        mu = self.multiplier * t_d / r.max_batch
        k = len(batch)
        tokens = sum(n for _, n in batch)
        attn = sum(n * (2 * (s.prefill_target - n) + n) for s, n in batch)   # after a cached prefix, if any
        chunks = self._chunks(r, batch) if self.chunk_tokens > 0 else batch
        mixable = bool(chunks)
        now_cost, mixed = self._insert_cost(r, tokens, attn, t_d, mixable)
        best_wait = self._best_deferral(r, k, tokens, attn, mu, t_d, memo[1] if memo and memo[0] is r else None,
                                        mixable)
        if now_cost / k <= best_wait:
            if mixed:
                return Iteration(MIXED, chunks, decode=True)
            return Iteration(PREFILL, batch, decode=False)
        self.deferrals += 1
        return Iteration(DECODE, decode=True)

    def _start(self, r: ReplicaState, batch: list[tuple[Sequence, int]]) -> Iteration:
        """An idle replica: prefill the first group of its start-up program; keep the rest.

        ``ramp`` "shortest": the queue's first request (the plan starts its fullest slot there: on
        the replica that holds the longest request, that request), then the shortest prompts, which
        fill the batch fastest; "plan": in queue order, the fullest slots first, so that the ones
        started late are those with room to spare (which is faster depends on the batch: the planner
        simulates both, ``planning.RULES``)."""
        if self.ramp != "plan":
            batch = [batch[k] for k in ramp_order([n for _, n in batch])]
        seqs = [s for s, _ in batch]
        sizes = startup_program(r.cost, [n for _, n in batch], r.max_batch, r.max_batched_tokens,
                                ramp_price(r.cost, r.max_batch, self.multiplier))
        groups, at = [], 0
        for k in sizes:
            groups.append(seqs[at:at + k])
            at += k
        self._program = groups[1:]
        return Iteration(PREFILL, admit_in_order(r, groups[0]), decode=False)

    def _next_group(self, r: ReplicaState) -> Iteration | None:
        """The start-up program's next group, those of it still waiting here (the controller may
        have moved some), mixed into the decode step; None when nothing of it can go in."""
        while self._program:
            group = [s for s in self._program.pop(0) if s.status == WAITING and s.replica == r.name]
            batch = admit_in_order(r, group)
            if batch:
                return Iteration(MIXED, batch, decode=True)
        return None

    def _finishing(self, r: ReplicaState) -> list[int]:
        """finishing[i]: running sequences predicted to finish after i+1 decode steps (i < horizon)."""
        return r.finishing(self.horizon)

    def _best_deferral(self, r: ReplicaState, k: int, tokens: int, attn: int, mu: float, t_d: float,
                       finishing: list[int] | None = None, mixable: bool = True) -> float:
        """min over j of the per-request cost of deferring j steps (inf if deferring gains nothing)."""
        horizon = self.horizon
        if finishing is None:
            finishing = self._finishing(r)
        if not any(finishing):
            return float("inf")                   # nothing predicted to finish: no later insertion is larger
        queue = r.waiting                         # prompts past the first k could join a later insertion
        waiting = len(queue)
        best = float("inf")
        lost = 0.0
        freed = 0
        last_kj = k
        for j in range(1, horizon + 1):
            lost += mu * (k + freed)                  # empty slot-steps of step j
            freed += finishing[j - 1]
            if freed == 0:
                continue
            kj = min(k + freed, waiting)
            if kj <= k:
                break                                 # no more prompts to gain by waiting
            if kj == last_kj:
                continue                              # same insertion, more slot-steps lost: no better
            for q in range(last_kj, kj):              # grow the insertion with the next prompts
                s = queue[q]
                n = r.prefill_rest(s)
                tokens += n
                attn += n * (2 * (s.prefill_target - n) + n)
            last_kj = kj
            cost, _ = self._insert_cost(r, tokens, attn, t_d, mixable)
            per = (cost + lost) / kj
            if per < best:
                best = per
        return best
