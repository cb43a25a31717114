"""``--history FILE``: (prompt_tokens, output_tokens) pairs of an earlier run, to start length predictors.

The file is an earlier run's output: a hybrid-ray results JSONL (``run -o``, ``simulate -o``) or an
OpenAI batch output file (its ``usage``); ``openai_batch.read_output`` reads both. Error lines carry
no lengths and are skipped.
"""
from __future__ import annotations

from pathlib import Path

from .errors import HistoryError, HybridRayError
from .openai_batch import read_output


def load_history(path: str | Path) -> list[tuple[int, int]]:
    """The finished requests' (prompt, output) token counts; ``HistoryError`` naming the file if it is
    missing, unreadable, malformed or holds no completion."""
    p = Path(path)
    if not p.is_file():
        raise HistoryError(f"--history {p}: no such file (an earlier run's -o output: results JSONL or "
                           f"OpenAI batch output)")
    try:
        res = read_output(p)   # plain records and OpenAI batch output lines
    except HybridRayError as e:
        msg = str(e)
        raise HistoryError(f"--history {msg}" if msg.startswith(str(p)) else f"--history {p}: {msg}") from None
    pairs = [(r.prompt_tokens, r.output_tokens) for r in res.records if r.output_tokens > 0]
    if not pairs:
        raise HistoryError(f"--history {p}: no finished request with output tokens in it")
    return pairs
