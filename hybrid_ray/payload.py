"""What a real engine needs of a request beyond its token counts, and what it gives back.

A ``Request`` scheduled on emulated replicas is only token counts. One that a real engine runs
(``--engine vllm|transformers`` over an OpenAI batch file) also carries a ``Payload``: its prompt
token ids (the model's own tokenizer and chat template already applied) and its sampling
parameters. The engine returns a ``Completion`` for every sequence it finishes. Both are plain,
picklable data: they cross Ray actor boundaries with the request.

``prompt_hash_ids`` gives a prompt's token ids the public prefix-trace form the simulator and the
planner read (``Request.hash_ids``, ``prefix_cache.py``): one id per 512-token block.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from .prefix_cache import HASH_BLOCK_TOKENS

STOP, LENGTH = "stop", "length"          # OpenAI finish reasons
SAMPLING_EPS = 1e-5                      # vLLM's: a temperature below it samples greedily


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """The OpenAI body's sampling fields that vLLM supports (vLLM's ``SamplingParams`` defaults).

    ``max_tokens`` is the bound on generated tokens; ``Request.output_tokens`` equals it for a real
    run (the true length is learned when the engine stops the sequence). ``top_k`` 0 = off.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def seeded(self) -> bool:
        """Random sampling from its own seeded generator (vLLM's ``SamplingType.RANDOM_SEED``): a seed
        and a temperature vLLM does not treat as greedy. Such a sequence draws from a per-request
        ``torch.Generator``, which vLLM rewinds after a partial prefill (``set_offset``), something a
        CPU generator cannot do: see ``ReplicaState.whole_seeded``."""
        return self.seed is not None and self.temperature >= SAMPLING_EPS


@dataclass(frozen=True, slots=True)
class Payload:
    """A real request: prompt token ids and sampling; ``group`` keys length predictors (the batch
    line's ``model``, or a shared-prefix group)."""

    token_ids: tuple[int, ...]
    sampling: SamplingSpec
    group: str = ""


@dataclass(slots=True)
class Completion:
    """A sequence an engine finished: its generated tokens, decoded text and why it stopped."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = LENGTH           # "stop" (EOS or a stop string) | "length" (max_tokens)


def prompt_hash_ids(token_ids: Sequence[int]) -> tuple[int, ...]:
    """A prompt's ``hash_ids`` from its token ids: one id per ``HASH_BLOCK_TOKENS`` (512) tokens, the last
    block partial or not, as public prefix traces publish them. Chained, as Mooncake's are: id ``j``
    hashes id ``j - 1`` and block ``j``'s tokens, so two prompts' ``j``-th ids agree exactly when their
    tokens agree up to the end of block ``j`` (a partial last block: only an equal one). Ids are
    63-bit non-negative integers (BLAKE2b), the same in every process and run."""
    out: list[int] = []
    prev = b""
    for i in range(0, len(token_ids), HASH_BLOCK_TOKENS):
        block = array("q", token_ids[i:i + HASH_BLOCK_TOKENS])
        digest = hashlib.blake2b(prev + block.tobytes(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "big") >> 1)
        prev = digest
    return tuple(out)
