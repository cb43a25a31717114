"""``--history FILE``: an earlier run's requests and their true output lengths, to start length predictors.

Each row is a ``HistoryRow``: a (prompt_tokens, output_tokens) pair (what ``quantile`` and ``online``
read) that may carry the ``request`` it came from, whose prompt text, kind, model, system prompt and
max_tokens (``Request.info``) the ``learned`` predictor reads (never its ``output_tokens``: the row's
second item is the length it learns). Files, told apart by their first object:

* a workload file (``.jsonl``/``.csv`` with ``prompt_tokens``/``output_tokens``, and ``prompt`` or
  ``messages`` text: ``workload.load_file``), e.g. a pilot run's requests with their lengths, or the
  ``mixed-tasks`` generator's file: rows with text;
* an earlier run's output: a hybrid-ray results JSONL (``run -o``, ``simulate -o``) or an OpenAI batch
  output file (its ``usage``; ``openai_batch.read_output``): pairs, error lines skipped;
* an OpenAI batch input file: the prompts of an output file given beside it (``--history OUT
  --history IN``, joined by custom_id), or rows itself where its lines carry ``output_tokens``.

Several ``--history`` files add up. A file that is missing, malformed, or from which no row with an
output length comes is a ``HistoryError`` naming it (one line, exit 2).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .errors import HistoryError, HybridRayError, one_line
from .openai_batch import first_object, read_batch, read_output
from .workload import Request, load_file

class HistoryRow(tuple):
    """``(prompt_tokens, output_tokens)`` with the ``request`` it came from (None: counts only)."""

    def __new__(cls, prompt_tokens: int, output_tokens: int, request: Request | None = None):
        row = super().__new__(cls, (int(prompt_tokens), int(output_tokens)))
        row.request = request
        return row

    def __getnewargs__(self):
        return (self[0], self[1], self.request)


def _kind(p: Path) -> str:
    """workload | results | batch-output | batch-input, from the first parseable object of the file."""
    if p.suffix.lower() == ".csv":
        return "workload"
    try:
        obj = first_object(p)
    except OSError as e:
        raise HistoryError(f"--history {p}: cannot read ({e.strerror or e})") from None
    if obj is None:
        return "results"
    if "custom_id" in obj:
        return "batch-input" if ("body" in obj or "method" in obj or "url" in obj) else "batch-output"
    if "replica" in obj or "finish_s" in obj or "error" in obj:
        return "results"
    if any(k in obj for k in ("output_tokens", "prompt_tokens", "prompt", "messages")):
        return "workload"
    return "results"


def _rethrow(p: Path, e: HybridRayError) -> HistoryError:
    msg = one_line(e)
    return HistoryError(f"--history {msg}" if msg.startswith(str(p)) else f"--history {p}: {msg}")


def _batch_requests(p: Path) -> tuple[dict[str, Request], dict[str, int]]:
    """(custom_id -> request, custom_id -> explicit body.output_tokens) of a batch input's valid lines."""
    try:
        batch = read_batch(p)
    except HybridRayError as e:
        raise _rethrow(p, e) from None
    explicit: dict[str, int] = {}
    with p.open("r", encoding="utf-8-sig", errors="replace") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                continue
            body = obj.get("body") if isinstance(obj, dict) else None
            cid = obj.get("custom_id") if isinstance(obj, dict) else None
            if isinstance(body, dict) and isinstance(cid, str) and cid in batch.lines \
                    and body.get("output_tokens") is not None:
                explicit[cid] = batch.lines[cid].request.output_tokens     # capped at max_tokens
    return {cid: b.request for cid, b in batch.lines.items()}, explicit


def load_history(path: str | Path | Iterable[str | Path]) -> list[HistoryRow]:
    """The rows of one history file or several (module docstring); ``HistoryError`` naming the file if
    one is missing, unreadable, malformed or adds nothing."""
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(x) for x in path]
    rows: list[HistoryRow] = []
    outputs: list[tuple[Path, list]] = []          # result records waiting for their prompts
    prompts: dict[str, Request] = {}
    inputs: list[Path] = []
    for p in paths:
        if not p.is_file():
            raise HistoryError(f"--history {p}: no such file (an earlier run's -o output: results JSONL or "
                               f"OpenAI batch output; or a workload file with output_tokens)")
        kind = _kind(p)
        if kind == "workload":
            try:
                reqs = load_file(p)
            except HybridRayError as e:
                raise _rethrow(p, e) from None
            rows += [HistoryRow(q.prompt_tokens, q.output_tokens, q) for q in reqs]
        elif kind == "batch-input":
            reqs, explicit = _batch_requests(p)
            prompts.update(reqs)
            rows += [HistoryRow(reqs[c].prompt_tokens, n, reqs[c]) for c, n in explicit.items()]
            if not explicit:
                inputs.append(p)
        else:
            try:
                res = read_output(p)       # plain records and OpenAI batch output lines
            except HybridRayError as e:
                raise _rethrow(p, e) from None
            recs = [r for r in res.records if r.output_tokens > 0]
            if not recs:
                raise HistoryError(f"--history {p}: no finished request with output tokens in it")
            outputs.append((p, recs))
    for p, recs in outputs:
        rows += [HistoryRow(r.prompt_tokens, r.output_tokens, prompts.get(r.id)) for r in recs]
    if inputs and not outputs:
        raise HistoryError(f"--history {inputs[0]}: an OpenAI batch input holds no output lengths; give its output "
                           f"file too (--history OUT --history IN)")
    if not rows:
        raise HistoryError(f"--history {paths[0]}: no finished request with output tokens in it")
    return rows
