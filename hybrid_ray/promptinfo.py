"""What a length predictor may read of a request's prompt besides its length: ``PromptInfo``.

Plain data, made by the loaders (workload files with ``prompt``/``messages``, OpenAI batch lines,
the mixed-task generator) and read only by ``policies/predict.py``'s learned predictor. It never
holds the output length.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

# What a PromptInfo keeps of a prompt's text: its head and tail (instructions sit at either end;
# the middle of a long document says little about the answer's length), so memory stays bounded.
TEXT_HEAD_CHARS = 2048
TEXT_TAIL_CHARS = 512
KINDS: tuple[str, ...] = ("chat", "completion")


@dataclass(frozen=True, slots=True)
class PromptInfo:
    """What a length predictor may read of a request besides its prompt length: never its output.

    ``text``: the prompt (a chat: its messages' contents, one per line), cut to its first
    ``TEXT_HEAD_CHARS`` and last ``TEXT_TAIL_CHARS`` characters; ``token_ids``: a prompt given as token
    ids only (cut the same way); ``kind``: chat | completion; ``model``: the line's model; ``prefix``: a
    hash of the shared prefix (a chat's system prompt), '' without one; ``max_tokens``: the bound on the
    output, None when the line has none. Plain data: it travels with the request to Ray actors.
    """

    text: str = ""
    token_ids: tuple[int, ...] = ()
    kind: str = ""
    model: str = ""
    prefix: str = ""
    max_tokens: int | None = None


def _cut_text(text: str) -> str:
    if len(text) <= TEXT_HEAD_CHARS + TEXT_TAIL_CHARS:
        return text
    return text[:TEXT_HEAD_CHARS] + "\n" + text[-TEXT_TAIL_CHARS:]


def prefix_hash(text: str) -> str:
    """A short stable hash of a shared prefix (system prompt, template): '' for no prefix."""
    if not text:
        return ""
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]


def prompt_info(*, text: str | None = None, messages: Sequence[dict] | None = None,
                token_ids: Sequence[int] | None = None, kind: str = "", model: str = "",
                max_tokens: int | None = None) -> PromptInfo:
    """A ``PromptInfo`` from a completion prompt (``text`` or ``token_ids``) or chat ``messages``
    (dicts with string ``role`` and ``content``): the system/developer messages make the prefix."""
    prefix = ""
    if messages is not None:
        kind = kind or "chat"
        system = "\n".join(m["content"] for m in messages if m.get("role") in ("system", "developer"))
        prefix = prefix_hash(system)
        text = "\n".join(m["content"] for m in messages)
    ids: tuple[int, ...] = ()
    if token_ids is not None and not text:
        ids = tuple(token_ids)
        if len(ids) > TEXT_HEAD_CHARS + TEXT_TAIL_CHARS:
            ids = ids[:TEXT_HEAD_CHARS] + ids[-TEXT_TAIL_CHARS:]
    return PromptInfo(_cut_text(text or ""), ids, kind, model, prefix, max_tokens)
