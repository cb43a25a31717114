"""Workloads whose prompts share long prefixes, as token counts plus ``hash_ids`` (no text).

Typical batch jobs repeat a system prompt, a document under many questions, or a few-shot template;
vLLM's prefix cache then skips the shared blocks. These generators make such batches in the public
prefix-trace form (Mooncake's ``hash_ids``: one id per 512 tokens of the prompt; two prompts share
a block when their ids agree up to it), so the simulator's replicas (``prefix_cache.py``) can price
what a hit saves. All requests arrive at t = 0 (a batch); seeded with ``random.Random`` and a
string seed, so the same ``(n, seed)`` gives the same requests everywhere. The generators make
``Line``s; ``workload.prefix_requests`` (``--workload doc-qa[:N[:SEED]]``) makes them requests (this
module imports nothing of the package but ``prefix_cache``: ``workload`` imports it).

* ``doc-qa[:N[:SEED]]`` (default N = 3000): questions over ``DOC_QA_DOCS`` = 150 documents of
  2k-8k tokens, picked with Zipf popularity (exponent 1: a few documents draw most questions).
  Prompt = a shared 512-token system prompt + the document + a 20-60 token question; output 20-300
  tokens. Questions on one document share the system prompt's block and every 512-block lying
  wholly inside the system prompt + document; the block where the question starts is the
  request's own. 150 documents (~750k tokens) do not fit one H100 replica's KV (112k tokens).
* ``few-shot[:N[:SEED]]``: ``FEW_SHOT_TEMPLATES`` = 8 few-shot prefixes of 1k-3k tokens (the same
  for every request of a template, picked uniformly) + a 20-100 token question; output 10-200.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import NamedTuple

from .prefix_cache import HASH_BLOCK_TOKENS

DOC_QA, FEW_SHOT = "doc-qa", "few-shot"
NAMES: tuple[str, ...] = (DOC_QA, FEW_SHOT)
DEFAULT_N = 3000
SYSTEM_TOKENS = HASH_BLOCK_TOKENS           # one shared block
DOC_QA_DOCS = 150
DOC_TOKENS = (2000, 8000)
QUESTION_TOKENS = (20, 60)
ANSWER_TOKENS = (20, 300)
ZIPF_EXPONENT = 1.0
FEW_SHOT_TEMPLATES = 8
TEMPLATE_TOKENS = (1000, 3000)
FEW_SHOT_QUESTION_TOKENS = (20, 100)
FEW_SHOT_ANSWER_TOKENS = (10, 200)


class Line(NamedTuple):
    """One generated request: what a workload file line holds."""

    id: str
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"id": self.id, "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "hash_ids": list(self.hash_ids)}


class _Ids:
    """Fresh block ids: a shared block gets one id, reused by every prompt holding it."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _hash_ids(shared: list[int], shared_tokens: int, prompt_tokens: int, ids: _Ids) -> tuple[int, ...]:
    """A prompt's ids: the shared prefix's ids for each 512-block lying wholly inside its first
    ``shared_tokens`` tokens, fresh ids for the rest (the block where the prompt's own part starts,
    and after)."""
    whole = min(shared_tokens // HASH_BLOCK_TOKENS, len(shared))
    total = -(-prompt_tokens // HASH_BLOCK_TOKENS)
    return tuple(shared[:whole]) + tuple(ids.take(total - whole))


def doc_qa(n: int = DEFAULT_N, seed: int = 0, docs: int = DOC_QA_DOCS, prefix: str = DOC_QA) -> list[Line]:
    """``n`` questions over ``docs`` documents (Zipf popularity), ids ``<prefix>-<k>``, all at t = 0."""
    _check(n, "n")
    _check(docs, "docs")
    rng = random.Random(f"{DOC_QA}:{seed}:{docs}")
    ids = _Ids()
    system = ids.take(1)
    lengths = [rng.randint(*DOC_TOKENS) for _ in range(docs)]
    shared = [system + ids.take(-(-ln // HASH_BLOCK_TOKENS)) for ln in lengths]   # system + document blocks
    weights = [1.0 / (k + 1) ** ZIPF_EXPONENT for k in range(docs)]
    out = []
    for k, d in enumerate(rng.choices(range(docs), weights=weights, k=n)):
        context = SYSTEM_TOKENS + lengths[d]
        prompt = context + rng.randint(*QUESTION_TOKENS)
        out.append(Line(f"{prefix}-{k}", prompt, rng.randint(*ANSWER_TOKENS),
                        _hash_ids(shared[d], context, prompt, ids)))
    return out


def few_shot(n: int = DEFAULT_N, seed: int = 0, templates: int = FEW_SHOT_TEMPLATES,
             prefix: str = FEW_SHOT) -> list[Line]:
    """``n`` questions, each after one of ``templates`` shared few-shot prefixes (uniform), at t = 0."""
    _check(n, "n")
    _check(templates, "templates")
    rng = random.Random(f"{FEW_SHOT}:{seed}:{templates}")
    ids = _Ids()
    lengths = [rng.randint(*TEMPLATE_TOKENS) for _ in range(templates)]
    shared = [ids.take(-(-ln // HASH_BLOCK_TOKENS)) for ln in lengths]
    out = []
    for k in range(n):
        t = rng.randrange(templates)
        prompt = lengths[t] + rng.randint(*FEW_SHOT_QUESTION_TOKENS)
        out.append(Line(f"{prefix}-{k}", prompt, rng.randint(*FEW_SHOT_ANSWER_TOKENS),
                        _hash_ids(shared[t], lengths[t], prompt, ids)))
    return out


GENERATORS = {DOC_QA: doc_qa, FEW_SHOT: few_shot}


def parse_spec(spec: str) -> tuple[str, int, int] | None:
    """``doc-qa`` -> ("doc-qa", 3000, 0); ``doc-qa:N`` -> (name, N, 0); ``doc-qa:N:SEED``; the same for
    few-shot; anything else None."""
    for name in NAMES:
        if spec == name:
            return name, DEFAULT_N, 0
        m = re.fullmatch(rf"{name}:(\d+)(?::(-?\d+))?", spec)
        if m is not None and int(m.group(1)) >= 1:
            return name, int(m.group(1)), int(m.group(2) or 0)
    return None


def lines(name: str, n: int = DEFAULT_N, seed: int = 0) -> list[Line]:
    """The named generator's ``n`` lines (``parse_spec``'s triple)."""
    return GENERATORS[name](n, seed)


def write_jsonl(path: str | Path, name: str, n: int = DEFAULT_N, seed: int = 0) -> Path:
    """Write the workload as a file ``--workload FILE`` reads: id, prompt_tokens, output_tokens, hash_ids."""
    p = Path(path)
    with p.open("w", encoding="utf-8") as fh:
        for x in lines(name, n, seed):
            fh.write(json.dumps(x.to_dict()) + "\n")
    return p


def _check(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")


__all__ = ["NAMES", "Line", "doc_qa", "few_shot", "parse_spec", "lines", "write_jsonl"]
