"""OpenAI batch files: ``/v1/completions`` and ``/v1/chat/completions`` lines in, batch output lines out.

Input, one JSON object per line (the OpenAI Batch API's input file, also read by ``vllm run_batch``)::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}}

Each valid line becomes one ``Request`` whose id is its ``custom_id``, arriving at t = 0 (a batch).
A malformed line is not fatal: it becomes a ``BatchLineError`` (custom_id, or ``line-<n>`` when the
line has none, an OpenAI-style code and a message) and the rest of the batch runs. When another line
of the file claims ``line-<n>`` as its own custom_id, the placeholder is ``line-<n>#2`` (``#3``, ...):
no two output lines share a custom_id.

Real prompts: with a ``PromptEncoder`` (``prompts.py``: a real engine's model directory), each
line's prompt or chat messages are tokenized by the model's own tokenizer, as vLLM does, and the
request carries a ``Payload`` (the ids and the line's sampling fields); ``output_tokens`` is then
the max_tokens bound (capped at the model's context) and the engine decides the true length.
A prompt that leaves no room in the model's context is a ``context_length_exceeded`` line.

Without an encoder (emulated engine, simulate, plan), prompt tokens, first source that applies:
the body's ``prompt_token_ids`` (or a ``/v1/completions``
``prompt`` given as token ids): their count; an explicit ``prompt_tokens`` field in the body (a
hybrid-ray extension); the engine's tokenizer (``tokenizer(text) -> int``; the emulated engine has
none); else an estimate of ``ceil(characters / 4)`` (about 4 characters per token for English text
with BPE tokenizers of the GPT / LLaMA families), and for chat ``4 + ceil(characters / 4)`` per
message (the 4 covers the role and the chat template's separators).

Shared prefixes: a line whose prompt token ids are known (a real engine's model encoded it, or the
body gives ``prompt_token_ids`` / a token-id ``prompt``) carries ``hash_ids`` computed from them
(``payload.prompt_hash_ids``: one chained id per 512-token block, the public prefix-trace form), so
the simulator's prefix cache and the planner see which lines share a system prompt or a document.
A text line counted without its ids has none.

Output tokens: the engine generates up to ``max_tokens`` (chat: ``max_completion_tokens``, else
``max_tokens``); absent, 16 for ``/v1/completions`` (OpenAI's default) and 256 for chat (ours:
OpenAI's is "up to the context length"). The emulated engine and the simulator generate exactly
that many (EOS ignored), unless the body has an explicit ``output_tokens`` (a hybrid-ray extension
for simulation studies: the true length, capped at the max).

Sampling fields (vLLM's): ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``,
``presence_penalty``, ``frequency_penalty``, ``ignore_eos``; they are validated for every run, so
``simulate`` rejects what a real run would. Any other body key but ``model``, ``user`` and our
extensions is an ``invalid_request`` line (``logprobs``, ``tools``, ``response_format``, ...).

Output: one line per input line, in the OpenAI batch output format (``id``, ``custom_id``,
``response`` with ``status_code``, ``request_id``, ``body``; or ``error`` with ``code``, ``message``
and the input ``line``); ``usage.prompt_tokens_details.cached_tokens`` is the prompt tokens the
prefix cache served (vLLM's OpenAI server's field; ``format_success``); success lines also carry
our timing in a top-level ``"hybrid_ray"`` object. Lines are appended as requests finish and the
file is put in input order when the run ends (``BatchInput.output_format().finalize``), as
``vllm run_batch`` writes it.

This module is an adapter: the runtime and the driver use it through ``results.OutputFormat`` and
it imports neither them nor Ray. See docs/openai_batch.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RuntimeSetupError, WorkloadError, one_line
from .payload import LENGTH, STOP, Payload, SamplingSpec, prompt_hash_ids
from .promptinfo import PromptInfo, prompt_info
from .results import (CompletionRecord, ErrorLine, OutputFormat, ResultsError, ResultsFile, ResultsWriter,
                      read_results, replace_file)
from .workload import BUILTIN_WORKLOADS, Request, _check_limit, _select

if TYPE_CHECKING:
    from .config import ClusterSpec
    from .prompts import PromptEncoder

log = logging.getLogger(__name__)

COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
URLS: tuple[str, ...] = (COMPLETIONS_URL, CHAT_URL)
CHARS_PER_TOKEN = 4                  # estimate: ~4 characters per token (English, BPE tokenizers)
CHAT_MESSAGE_OVERHEAD_TOKENS = 4     # estimate: role + chat-template tokens per message
DEFAULT_MAX_TOKENS = {COMPLETIONS_URL: 16, CHAT_URL: 256}
DEFAULT_MODEL = "hybrid-ray-emulated"
EXTENSION_KEY = "hybrid_ray"         # our timing fields on success lines
_SNIFF_LINES = 20                    # auto-detection looks this far for a parseable object

# error codes (the OpenAI Batch API's where one fits)
INVALID_JSON = "invalid_json_line"
MISSING_PARAMETER = "missing_required_parameter"
INVALID_METHOD = "invalid_method"
INVALID_URL = "invalid_url"
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
INVALID_REQUEST = "invalid_request"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"

Tokenizer = Callable[[str], int]

# body keys: sampling fields we run (vLLM's names and defaults), keys read elsewhere, and keys that
# change nothing; anything else is rejected (a silent difference from vLLM's output would be worse)
SAMPLING_KEYS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                 "presence_penalty", "frequency_penalty", "ignore_eos")
BODY_KEYS = frozenset(SAMPLING_KEYS) | {"model", "user", "prompt", "messages", "n", "stream",
                                       "prompt_token_ids", "prompt_tokens", "output_tokens"}


class BatchPath(str):
    """A workload path given with ``-i``: read as an OpenAI batch file, whatever its lines hold."""

    __slots__ = ()


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BatchLine:
    """One valid input line."""

    custom_id: str
    line: int                        # 1-based line number in the file
    url: str
    model: str
    max_tokens: int                  # the bound on generated tokens (given or default; capped by the context)
    request: Request                 # id = custom_id
    prompt_source: str               # prompt_token_ids | prompt_tokens | tokenizer | estimate | model


@dataclass(frozen=True, slots=True)
class BatchLineError:
    """One input line that will not run: it gets an error output line instead."""

    custom_id: str                   # the line's custom_id, or a placeholder (by_line) when it has none
    line: int
    code: str
    message: str
    by_line: bool = False            # custom_id is the placeholder "line-<n>" (or "line-<n>#k", see read_batch)

    @property
    def keyed_by_line(self) -> bool:
        """True when the error accounts for an input line, not for a custom_id (see ``settles``)."""
        return self.code == DUPLICATE_CUSTOM_ID or self.by_line

    @property
    def output_id(self) -> str:
        return f"batch_req_{_hash(self.custom_id, str(self.line))}"

    def to_output(self) -> dict:
        return format_error(self.custom_id, self.code, self.message, line=self.line)


@dataclass(slots=True)
class BatchInput:
    """A parsed batch file: the requests to run, the lines that will not, and per-line metadata."""

    path: str
    requests: list[Request]
    errors: list[BatchLineError]
    ids: dict[str, str]              # custom_id -> request id (the same string)
    lines: dict[str, BatchLine] = field(default_factory=dict)   # by custom_id
    n_lines: int = 0                 # non-blank input lines considered (after --limit)

    def output_format(self) -> OutputFormat:
        """How a run writes, reads back and finally orders this batch's output file."""
        return OutputFormat(self.formatter(), parse_output_line, self.reorder, self.error_formatter())

    def positions(self) -> dict[str, int]:
        """custom_id -> input line, for every line that has one (valid, or an error keyed by custom_id)."""
        pos = {e.custom_id: e.line for e in self.errors if not e.keyed_by_line}
        pos.update((cid, b.line) for cid, b in self.lines.items())
        return pos

    def reorder(self, path: str | Path) -> None:
        """Rewrite an output file in input-line order (atomically), as ``vllm run_batch`` writes it.

        Error lines go to their ``line``; others to their custom_id's line; lines this batch does not
        know (another input) keep their order after the rest. A file that does not parse is left as is.
        """
        pos = self.positions()
        keyed = []
        try:
            raw = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
            for k, line in enumerate(raw):
                obj = json.loads(line)
                err = obj.get("error") if isinstance(obj, dict) else None
                at = err.get("line") if isinstance(err, dict) else None
                if not isinstance(at, int) or isinstance(at, bool):
                    at = pos.get(obj.get("custom_id")) if isinstance(obj, dict) else None
                keyed.append(((0, at, k) if at is not None else (1, 0, k), line))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log.warning("%s: not put in input order (%s)", path, e)
            return
        keyed.sort(key=lambda x: x[0])
        if [line for _, line in keyed] != raw:
            replace_file(path, (line for _, line in keyed))

    def formatter(self) -> Callable[[CompletionRecord], str]:
        """Record -> its OpenAI batch output line (for ``ResultsWriter(formatter=...)``)."""
        lines = self.lines

        def fmt(rec: CompletionRecord) -> str:
            meta = lines.get(rec.id)
            if meta is None:
                return _dumps(format_success(rec))
            return _dumps(format_success(rec, meta.custom_id, url=meta.url, model=meta.model,
                                         max_tokens=meta.max_tokens))
        return fmt

    def error_formatter(self) -> Callable[[str, str, str], str]:
        """(custom_id, code, message) -> its error output line, at the input line's place: a request
        that ran but will not complete (the engine failed on it twice, ``actors/driver.py``)."""
        lines = self.lines

        def fmt(cid: str, code: str, message: str) -> str:
            meta = lines.get(cid)
            return _dumps(format_error(cid, code, message, line=None if meta is None else meta.line))
        return fmt

    def pending_errors(self, existing: ResultsFile) -> list[BatchLineError]:
        """Error entries not yet in ``existing`` (an output file being resumed), in line order."""
        written = {e.id for e in existing.errors}
        settled = existing.ids
        return [e for e in self.errors
                if e.output_id not in written and (e.keyed_by_line or e.custom_id not in settled)]


def _dumps(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:24]


class _LineError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _number(raw: Any, name: str) -> float:
    try:
        ok = not isinstance(raw, bool) and isinstance(raw, (int, float)) and math.isfinite(raw)
    except OverflowError:              # an integer beyond any float
        ok = False
    if not ok:
        raise _LineError(INVALID_REQUEST, f"{name} must be a number, got {_short(raw)}")
    return float(raw)


def _short(raw: Any, limit: int = 80) -> str:
    """``repr(raw)`` cut to ``limit`` characters: a message stays one readable line."""
    try:
        text = repr(raw)
    except ValueError:                 # an int too long to print
        text = "a very long integer"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _sampling(body: dict, max_tokens: int) -> SamplingSpec:
    """The body's sampling fields as vLLM reads them, each checked against vLLM's range."""
    def get(key: str, default: Any) -> Any:
        v = body.get(key)
        return default if v is None else v

    temperature = _number(get("temperature", 1.0), "body.temperature")
    if temperature < 0:
        raise _LineError(INVALID_REQUEST, f"body.temperature must be >= 0, got {temperature:g}")
    top_p = _number(get("top_p", 1.0), "body.top_p")
    if not 0 < top_p <= 1:
        raise _LineError(INVALID_REQUEST, f"body.top_p must be in (0, 1], got {top_p:g}")
    top_k = get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise _LineError(INVALID_REQUEST, f"body.top_k must be an integer >= -1 (-1 or 0: off), got {top_k!r}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _LineError(INVALID_REQUEST, f"body.seed must be an integer, got {seed!r}")
    stop = get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise _LineError(INVALID_REQUEST, "body.stop must be a non-empty string or a list of them")
    penalties = []
    for key in ("presence_penalty", "frequency_penalty"):
        v = _number(get(key, 0.0), f"body.{key}")
        if not -2 <= v <= 2:
            raise _LineError(INVALID_REQUEST, f"body.{key} must be in [-2, 2], got {v:g}")
        penalties.append(v)
    ignore_eos = get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _LineError(INVALID_REQUEST, f"body.ignore_eos must be true or false, got {ignore_eos!r}")
    return SamplingSpec(max_tokens, temperature, top_p, max(top_k, 0), seed, tuple(stop), penalties[0],
                        penalties[1], ignore_eos)


def _check_keys(body: dict) -> None:
    """Reject body keys we do not run (null or false values change nothing and pass)."""
    for key, value in body.items():
        if key not in BODY_KEYS and value is not None and value is not False:
            raise _LineError(INVALID_REQUEST, f"body.{key} is not supported (hybrid-ray runs "
                                              f"{', '.join(SAMPLING_KEYS)}); drop it from the line")


def _positive_int(raw: Any, name: str) -> int:
    """A JSON integer >= 1 (bools and floats are rejected, as the OpenAI API does)."""
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _LineError(INVALID_REQUEST, f"{name} must be an integer >= 1, got {raw!r}")
    if raw < 1:
        raise _LineError(INVALID_REQUEST, f"{name} must be an integer >= 1, got {raw}")
    return raw


MAX_TOKEN_ID = 2**31 - 1            # token ids are int32 in vLLM and transformers


def _is_token_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _check_token_ids(ids: list[int], name: str) -> list[int]:
    """Token ids are integers in [0, 2**31 - 1]: a negative id indexes no vocabulary."""
    for k, t in enumerate(ids):
        if not 0 <= t <= MAX_TOKEN_ID:
            raise _LineError(INVALID_REQUEST, f"{name}[{k}] = {_short(t)}: token ids must be integers in "
                                              f"[0, {MAX_TOKEN_ID}]")
    return ids


def _completion_prompt(body: dict) -> str | list[int]:
    """The one prompt of a /v1/completions body: a string or a list of token ids."""
    if "prompt" not in body or body["prompt"] is None:
        raise _LineError(MISSING_PARAMETER, "body.prompt is required for /v1/completions")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and not _is_token_ids(prompt):
        if len(prompt) != 1:
            raise _LineError(INVALID_REQUEST, f"body.prompt holds {len(prompt)} prompts; hybrid-ray schedules one "
                                              "sequence per line: put each prompt on its own line")
        prompt = prompt[0]
    if isinstance(prompt, str) or _is_token_ids(prompt):
        if len(prompt) == 0:
            raise _LineError(INVALID_REQUEST, "body.prompt is empty")
        return prompt if isinstance(prompt, str) else _check_token_ids(prompt, "body.prompt")
    raise _LineError(INVALID_REQUEST, "body.prompt must be a string, a list of token ids, or a list holding one "
                                      f"of those; got {type(prompt).__name__}")


def _messages(body: dict) -> list[dict]:
    """Chat messages for the model's template: role and content text (text parts joined)."""
    return [{"role": m["role"], "content": text} for m, text in zip(body["messages"], _message_texts(body))]


def _message_texts(body: dict) -> list[str]:
    """The text of each chat message (text content parts joined; other parts are not counted)."""
    if "messages" not in body or body["messages"] is None:
        raise _LineError(MISSING_PARAMETER, "body.messages is required for /v1/chat/completions")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _LineError(INVALID_REQUEST, "body.messages must be a non-empty list of messages")
    texts = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _LineError(INVALID_REQUEST, f"body.messages[{k}] must be an object with a string 'role'")
        content = m.get("content")
        if content is None or isinstance(content, str):
            texts.append(content or "")
        elif isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict):
                    raise _LineError(INVALID_REQUEST, f"body.messages[{k}].content parts must be objects")
                if part.get("type") == "text":
                    if not isinstance(part.get("text"), str):
                        raise _LineError(INVALID_REQUEST, f"body.messages[{k}]: a text part needs a string 'text'")
                    parts.append(part["text"])
            texts.append("".join(parts))
        else:
            raise _LineError(INVALID_REQUEST, f"body.messages[{k}].content must be a string, a list of parts "
                                              f"or null, got {type(content).__name__}")
    return texts


def estimate_tokens(text: str) -> int:
    """The character-based estimate: ceil(len / 4) (about 4 characters per English BPE token)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _prompt_ids(url: str, body: dict) -> list[int] | None:
    """The prompt's token ids where the line gives them (validated body): ``prompt_token_ids``, or a
    ``/v1/completions`` prompt given as ids."""
    ids = body.get("prompt_token_ids")
    if ids is None and url == COMPLETIONS_URL:
        prompt = _completion_prompt(body)
        ids = None if isinstance(prompt, str) else prompt
    return ids


def _prompt_tokens(url: str, body: dict, tokenizer: Tokenizer | None) -> tuple[int, str]:
    """(prompt tokens, source); sources in priority order, see the module docstring."""
    ids = body.get("prompt_token_ids")
    if ids is not None:
        if not _is_token_ids(ids) or not ids:
            raise _LineError(INVALID_REQUEST, "body.prompt_token_ids must be a non-empty list of integers")
        _check_token_ids(ids, "body.prompt_token_ids")
    if url == COMPLETIONS_URL:
        prompt = _completion_prompt(body)      # validated even when another source gives the count
        if ids is None and not isinstance(prompt, str):
            ids = prompt
        texts = [prompt] if isinstance(prompt, str) else []
    else:
        texts = _message_texts(body)
    if ids is not None:
        return len(ids), "prompt_token_ids"
    if body.get("prompt_tokens") is not None:
        return _positive_int(body["prompt_tokens"], "body.prompt_tokens"), "prompt_tokens"
    count = tokenizer if tokenizer is not None else estimate_tokens
    if url == COMPLETIONS_URL:
        n = count(texts[0])
    else:
        n = sum(CHAT_MESSAGE_OVERHEAD_TOKENS + count(t) for t in texts)
    return max(1, int(n)), ("tokenizer" if tokenizer is not None else "estimate")


def _output_tokens(url: str, body: dict, chat_max_tokens: int) -> tuple[int, int]:
    """(tokens the engine generates, the max_tokens bound)."""
    key = "max_completion_tokens" if url == CHAT_URL and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    raw = body.get(key)
    bound = (DEFAULT_MAX_TOKENS[COMPLETIONS_URL] if url == COMPLETIONS_URL else chat_max_tokens) if raw is None \
        else _positive_int(raw, f"body.{key}")
    explicit = body.get("output_tokens")
    if explicit is None:
        return bound, bound
    return min(_positive_int(explicit, "body.output_tokens"), bound), bound


def _model_prompt(url: str, body: dict, encoder: PromptEncoder) -> list[int]:
    """The prompt's token ids as vLLM makes them (``prompts.PromptEncoder``); given ids as they are."""
    from .prompts import PromptError

    ids = body.get("prompt_token_ids")
    if ids is not None and (not _is_token_ids(ids) or not ids):
        raise _LineError(INVALID_REQUEST, "body.prompt_token_ids must be a non-empty list of integers")
    if ids is not None:
        _check_token_ids(ids, "body.prompt_token_ids")
    try:
        if url == COMPLETIONS_URL:
            prompt = _completion_prompt(body)
            if ids is None:
                ids = encoder.completion(prompt) if isinstance(prompt, str) else prompt
        else:
            _message_texts(body)                # validated
            if ids is None:
                ids = encoder.chat(_messages(body))
        return encoder.check_ids(list(ids))
    except PromptError as e:
        raise _LineError(INVALID_REQUEST, str(e)) from None


def _prompt_info(url: str, body: dict, model: str, max_tokens: int) -> PromptInfo:
    """What a length predictor may read of the line (validated body): its prompt text or token ids, the
    kind, the model, its system prompt's hash and max_tokens (``promptinfo.PromptInfo``)."""
    if url == CHAT_URL:
        return prompt_info(messages=_messages(body), model=model, max_tokens=max_tokens)
    prompt = _completion_prompt(body)
    if isinstance(prompt, str):
        return prompt_info(text=prompt, kind="completion", model=model, max_tokens=max_tokens)
    return prompt_info(token_ids=prompt, kind="completion", model=model, max_tokens=max_tokens)


def parse_line(text: str, line_no: int, tokenizer: Tokenizer | None = None,
               chat_max_tokens: int = DEFAULT_MAX_TOKENS[CHAT_URL],
               encoder: PromptEncoder | None = None) -> BatchLine | BatchLineError:
    """One input line -> a BatchLine, or the BatchLineError saying why it cannot run.

    With ``encoder`` (a real engine's model) the request carries a ``Payload`` and its counts are
    the model's (prompt ids; output = max_tokens, capped so prompt + output fits the context).
    """
    placeholder = f"line-{line_no}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return BatchLineError(placeholder, line_no, INVALID_JSON, f"line {line_no}: invalid JSON ({exc.msg})",
                              by_line=True)
    except (ValueError, RecursionError) as exc:      # a 5,000-digit number; [[[[...]]]] nested too deep
        what = "nested too deeply" if isinstance(exc, RecursionError) else one_line(exc)
        return BatchLineError(placeholder, line_no, INVALID_JSON, f"line {line_no}: invalid JSON ({what})",
                              by_line=True)
    if not isinstance(obj, dict):
        return BatchLineError(placeholder, line_no, INVALID_JSON,
                              f"line {line_no}: expected a JSON object, got {type(obj).__name__}", by_line=True)
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid.strip():
        what = "missing" if cid is None else f"must be a non-empty string, got {_short(cid)}"
        return BatchLineError(placeholder, line_no, MISSING_PARAMETER, f"line {line_no}: custom_id {what}",
                              by_line=True)
    try:
        for key in ("method", "url", "body"):
            if obj.get(key) is None:
                raise _LineError(MISSING_PARAMETER, f"{key} is required")
        if obj["method"] != "POST":
            raise _LineError(INVALID_METHOD, f"method must be POST, got {obj['method']!r}")
        url = obj["url"]
        if url not in URLS:
            raise _LineError(INVALID_URL, f"url {url!r} is not supported; expected {' or '.join(URLS)}")
        body = obj["body"]
        if not isinstance(body, dict):
            raise _LineError(INVALID_REQUEST, f"body must be a JSON object, got {type(body).__name__}")
        n = body.get("n")
        if n is not None and n != 1:
            raise _LineError(INVALID_REQUEST, f"body.n = {n!r}: one completion per line is supported; repeat the "
                                              "line with other custom_ids instead")
        if body.get("stream"):
            raise _LineError(INVALID_REQUEST, "body.stream must not be true in a batch")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _LineError(INVALID_REQUEST, f"body.model must be a string, got {model!r}")
        _check_keys(body)
        output, bound = _output_tokens(url, body, chat_max_tokens)
        sampling = _sampling(body, bound)
        if encoder is None:
            prompt, source = _prompt_tokens(url, body, tokenizer)
            ids = _prompt_ids(url, body) if source == "prompt_token_ids" else None
            req = Request(cid, prompt, output, 0.0, info=_prompt_info(url, body, model or "", bound),
                          hash_ids=prompt_hash_ids(ids) if ids else None)
        else:
            ids = _model_prompt(url, body, encoder)
            info = _prompt_info(url, body, model or "", bound)
            ctx = encoder.context
            if ctx is not None and len(ids) + 1 > ctx:
                raise _LineError(CONTEXT_LENGTH_EXCEEDED, f"the prompt has {len(ids)} tokens; the model's context "
                                                          f"({encoder.name}) holds {ctx} with at least one output "
                                                          f"token")
            if ctx is not None:
                bound = min(bound, ctx - len(ids))
            payload = Payload(tuple(ids), replace(sampling, max_tokens=bound), group=model or "")
            req, source = Request(cid, len(ids), bound, 0.0, payload, replace(info, max_tokens=bound),
                                  prompt_hash_ids(ids)), "model"
    except _LineError as exc:
        return BatchLineError(cid, line_no, exc.code, f"line {line_no}: {exc}")
    return BatchLine(cid, line_no, url, model or DEFAULT_MODEL, bound, req, source)


def read_batch(path: str | Path, *, tokenizer: Tokenizer | None = None, limit: int | None = None,
               seed: int | None = None, chat_max_tokens: int = DEFAULT_MAX_TOKENS[CHAT_URL],
               encoder: PromptEncoder | None = None) -> BatchInput:
    """Parse an OpenAI batch input file; malformed lines become error entries, never exceptions.

    ``limit`` keeps the first N non-blank lines (with ``seed``: a seeded sample of N, in file
    order), as ``--limit``/``--seed`` do for other workloads. A custom_id claimed by an earlier
    line (valid or not) makes the later line a ``duplicate_custom_id`` error. Only an unreadable
    or empty file raises (WorkloadError). ``encoder``: real prompts, see ``parse_line``.
    """
    p = Path(path)
    _check_limit(limit)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise WorkloadError(f"{p}: no such OpenAI batch file") from None
    except OSError as exc:
        raise WorkloadError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    entries: list[BatchLine | BatchLineError] = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            entries.append(BatchLineError(f"line-{n}", n, INVALID_JSON, f"line {n}: not UTF-8 text ({exc.reason})",
                                          by_line=True))
            continue
        entries.append(parse_line(text, n, tokenizer, chat_max_tokens, encoder))
    if not entries:
        raise WorkloadError(f"{p}: empty OpenAI batch file (expected one request object per line)")
    entries = _select(_unique_placeholders(entries), limit, seed)
    claimed: dict[str, int] = {}
    lines: dict[str, BatchLine] = {}
    errors: list[BatchLineError] = []
    for e in entries:
        if isinstance(e, BatchLineError) and e.keyed_by_line:
            errors.append(e)
            continue
        if e.custom_id in claimed:
            errors.append(BatchLineError(e.custom_id, e.line, DUPLICATE_CUSTOM_ID,
                                         f"line {e.line}: custom_id {e.custom_id!r} already used on line "
                                         f"{claimed[e.custom_id]}"))
            continue
        claimed[e.custom_id] = e.line
        if isinstance(e, BatchLineError):
            errors.append(e)
        else:
            lines[e.custom_id] = e
    requests = [b.request for b in lines.values()]
    return BatchInput(str(p), requests, errors, {cid: b.request.id for cid, b in lines.items()}, lines,
                      len(entries))


def _unique_placeholders(entries: list[BatchLine | BatchLineError]) -> list[BatchLine | BatchLineError]:
    """Rename a placeholder ``line-<n>`` that some line of the file claims as its custom_id to
    ``line-<n>#k`` (the first k >= 2 nobody claims): every output line then has its own custom_id.
    Done over the whole file, before --limit, so the name does not depend on the sample."""
    claimed = {e.custom_id for e in entries if not (isinstance(e, BatchLineError) and e.by_line)}
    out: list[BatchLine | BatchLineError] = []
    for e in entries:
        if isinstance(e, BatchLineError) and e.by_line and e.custom_id in claimed:
            k = 2
            while f"{e.custom_id}#{k}" in claimed:
                k += 1
            e = replace(e, custom_id=f"{e.custom_id}#{k}")
            claimed.add(e.custom_id)
        out.append(e)
    return out


def is_placeholder(custom_id: str, line: int) -> bool:
    """Whether ``custom_id`` is the placeholder of input line ``line`` (``line-<n>`` or ``line-<n>#k``)."""
    return re.fullmatch(rf"line-{line}(#[0-9]+)?", custom_id) is not None


def check_batch_feasible(batch: BatchInput, cluster: ClusterSpec) -> BatchInput:
    """Move requests no replica can hold (prompt + max output > every KV cache) to the errors."""
    max_kv = max(g.kv_capacity_tokens for g in cluster.groups)
    bad = [b for b in batch.lines.values() if b.request.prompt_tokens + b.request.output_tokens > max_kv]
    if not bad:
        return batch
    drop = {b.custom_id for b in bad}
    errors = batch.errors + [
        BatchLineError(b.custom_id, b.line, CONTEXT_LENGTH_EXCEEDED,
                       f"line {b.line}: prompt ({b.request.prompt_tokens} tokens) + output "
                       f"({b.request.output_tokens}) = {b.request.prompt_tokens + b.request.output_tokens} tokens; "
                       f"the largest replica KV cache of {cluster.name} holds {max_kv}")
        for b in bad]
    lines = {cid: b for cid, b in batch.lines.items() if cid not in drop}
    return replace(batch, requests=[b.request for b in lines.values()], lines=lines,
                   errors=sorted(errors, key=lambda e: e.line),
                   ids={cid: b.request.id for cid, b in lines.items()})


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def first_object(p: Path) -> dict | None:
    """The first JSON object among a file's first _SNIFF_LINES lines (what auto-detection reads), or
    None; OSError propagates."""
    with p.open("r", encoding="utf-8-sig", errors="replace") as fh:
        for k, line in enumerate(fh):
            if k >= _SNIFF_LINES:
                break
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(obj, dict):
                return obj
    return None


def is_batch_workload(spec: object) -> bool:
    """True for a ``BatchPath``, or a .jsonl/.json file whose first parseable object has ``custom_id``
    or ``body`` (plain workload files have ``prompt_tokens``/``output_tokens``)."""
    if isinstance(spec, BatchPath):
        return True
    if not isinstance(spec, (str, Path)) or str(spec) in BUILTIN_WORKLOADS:
        return False
    p = Path(spec)
    if p.suffix.lower() not in (".jsonl", ".json") or not p.is_file():
        return False
    try:
        obj = first_object(p)
    except OSError:
        return False
    return obj is not None and ("custom_id" in obj or "body" in obj)


def describe_errors(batch: BatchInput, shown: int = 3) -> str:
    """'k of n lines will not run: line 3 (q7): invalid_request: ...; ...' (empty when none)."""
    if not batch.errors:
        return ""
    first = "; ".join(one_line(f"line {e.line} ({_cut(e.custom_id)}): {e.code}: {e.message.split(': ', 1)[-1]}")
                      for e in batch.errors[:shown])
    more = f"; ... (+{len(batch.errors) - shown} more)" if len(batch.errors) > shown else ""
    return f"{batch.path}: {len(batch.errors)} of {batch.n_lines} lines will not run: {first}{more}"


def check_some_valid(batch: BatchInput) -> None:
    """A batch with no line that can run is a user error (one line, exit 2), not an empty run."""
    if not batch.requests:
        why = describe_errors(batch).split(" will not run: ", 1)[-1]
        raise WorkloadError(f"{batch.path}: no valid request in {batch.n_lines} line(s): {why}")


def load_batch_inputs(config: str, path: str, limit: int | None = None,
                      seed: int | None = None) -> tuple[ClusterSpec, BatchInput]:
    """Cluster + parsed batch with infeasible requests moved to the errors (for simulate / plan)."""
    from .config import load_cluster

    cluster = load_cluster(config)
    return cluster, check_batch_feasible(read_batch(path, limit=limit, seed=seed), cluster)


def load_batch_requests(config: str, path: str, limit: int | None = None,
                        seed: int | None = None) -> tuple[ClusterSpec, list[Request]]:
    """``inputs.load_inputs`` for a batch file: the runnable requests; the others are logged."""
    cluster, batch = load_batch_inputs(config, path, limit, seed)
    check_some_valid(batch)
    if batch.errors:
        log.warning("%s", describe_errors(batch))
    return cluster, batch.requests


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def format_success(record: CompletionRecord, custom_id: str | None = None, *, url: str = COMPLETIONS_URL,
                   model: str = DEFAULT_MODEL, max_tokens: int | None = None, created: int | None = None) -> dict:
    """A finished request's OpenAI batch output line.

    A real engine's record carries the generated text and its finish reason ("stop": EOS or a
    stop string; "length": max_tokens). The emulated engine produces no text: ``text`` /
    ``message.content`` is "", and ``finish_reason`` is "length" when the output reached
    ``max_tokens`` (always, for the emulator), else "stop". ``usage.completion_tokens`` is the
    tokens generated. ``usage.prompt_tokens_details.cached_tokens`` is the prompt tokens found in the
    prefix cache (vLLM's ``num_cached_tokens``; its OpenAI server's field, there with
    ``--enable-prompt-tokens-details``): on every line of a real engine (0 included, as vLLM reports
    it), and where the emulated engine or the simulator modelled a hit. Ids are stable hashes of the
    custom_id; ``created`` is the Unix time of writing.
    """
    cid = record.id if custom_id is None else custom_id
    h = _hash(cid)
    text = record.text or ""
    finish = record.finish_reason or (LENGTH if max_tokens is None or record.output_tokens >= max_tokens else STOP)
    if url == CHAT_URL:
        obj, body_id = "chat.completion", f"chatcmpl-{h}"
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        obj, body_id = "text_completion", f"cmpl-{h}"
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    usage: dict[str, Any] = {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.output_tokens,
                             "total_tokens": record.prompt_tokens + record.output_tokens}
    if record.cached_tokens or record.text is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": record.cached_tokens}
    body = {"id": body_id, "object": obj, "created": int(time.time()) if created is None else created,
            "model": model, "choices": [choice], "usage": usage}
    return {"id": f"batch_req_{h}", "custom_id": cid,
            "response": {"status_code": 200, "request_id": f"req_{h}", "body": body},
            "error": None,
            EXTENSION_KEY: {"replica": record.replica, "arrival_s": record.arrival_s,
                            "first_token_s": record.first_token_s, "finish_s": record.finish_s,
                            "preemptions": record.preemptions}}


def format_error(custom_id: str, code: str, message: str, *, line: int | None = None) -> dict:
    """An error output line: ``response`` null, ``error`` {code, message[, line]}."""
    err: dict[str, Any] = {"code": code, "message": message}
    if line is not None:
        err["line"] = line
    return {"id": f"batch_req_{_hash(custom_id, str(line))}", "custom_id": custom_id, "response": None,
            "error": err}


def parse_output_line(obj: dict, where: str) -> CompletionRecord | ErrorLine | None:
    """An output line read back (resume): a success line -> CompletionRecord keyed by custom_id (with
    its text and finish reason); an error line -> ErrorLine; an object without ``custom_id`` -> None
    (a plain record). Lines from other tools (vLLM's, without our timing) count as done."""
    if "custom_id" not in obj:
        return None
    cid = obj.get("custom_id")
    if not isinstance(cid, str):
        raise ResultsError(f"{where}: custom_id must be a string, got {cid!r}")
    err, resp = obj.get("error"), obj.get("response")
    if err is not None:
        if isinstance(err, dict):
            code, message, line = str(err.get("code") or ""), str(err.get("message") or ""), err.get("line")
        else:                                  # vLLM writes the message as a plain string
            code, message, line = "", str(err), None
        line = line if isinstance(line, int) and not isinstance(line, bool) else None
        by_line = code == DUPLICATE_CUSTOM_ID or (line is not None and is_placeholder(cid, line))
        return ErrorLine(str(obj.get("id") or ""), cid, code, message, line, None if by_line else cid)
    if not isinstance(resp, dict):
        raise ResultsError(f"{where}: an OpenAI batch output line needs a 'response' object or an 'error'")
    body = resp.get("body") if isinstance(resp.get("body"), dict) else {}
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    ext = obj.get(EXTENSION_KEY) if isinstance(obj.get(EXTENSION_KEY), dict) else {}
    choices = body.get("choices") if isinstance(body.get("choices"), list) else []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    text = choice.get("text", msg.get("content"))
    finish = choice.get("finish_reason")
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    try:
        rec = CompletionRecord(cid, str(ext.get("replica", "")), float(ext.get("arrival_s", 0.0)),
                               float(ext.get("first_token_s", 0.0)), float(ext.get("finish_s", 0.0)),
                               int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                               int(ext.get("preemptions", 0)), text if isinstance(text, str) else None,
                               finish if isinstance(finish, str) else None, int(details.get("cached_tokens") or 0))
    except (TypeError, ValueError) as e:
        raise ResultsError(f"{where}: bad value ({e})") from None
    if not all(math.isfinite(x) for x in (rec.arrival_s, rec.first_token_s, rec.finish_s)):
        raise ResultsError(f"{where}: times must be finite numbers")
    return rec


# ---------------------------------------------------------------------------------------------
# Runs: `hybrid-ray run -i IN -o OUT` and `hybrid-ray simulate -i IN -o OUT`
# ---------------------------------------------------------------------------------------------

def read_output(path: str | Path, missing_ok: bool = False) -> ResultsFile:
    """``results.read_results`` that also reads OpenAI batch output lines (``parse_output_line``)."""
    return read_results(path, missing_ok, parse_output_line)


def prepare_batch_run(opts, cluster: ClusterSpec | None = None, requests: list[Request] | None = None, *,
                      encoder: PromptEncoder | None = None):
    """For ``runtime.run``: when ``opts.workload`` is an OpenAI batch file (and no requests were
    given), parse it (``encoder``: real prompts for a real engine), write the error lines the
    output file lacks, and return ``(opts, cluster, requests)`` with the output file as the resume
    file and ``output_format`` writing OpenAI lines. Otherwise return the arguments unchanged.

    ``-o`` (or ``--resume``) is the resume file: if it exists, the custom_ids it holds (success or
    error lines) are skipped and new lines are appended, so every input line ends with exactly one
    output line however often the run is interrupted and restarted. ``opts`` is duck-typed (a
    ``RunOptions``): this module does not import the runtime.
    """
    if requests is not None or not is_batch_workload(opts.workload):
        return opts, cluster, requests
    from .config import load_cluster

    if cluster is None:
        cluster = load_cluster(opts.config)
    batch = check_batch_feasible(read_batch(opts.workload, limit=opts.limit, seed=opts.seed, encoder=encoder),
                                 cluster)
    check_some_valid(batch)            # as simulate: nothing would run, and no run should start
    if opts.resume and opts.output and Path(opts.output).resolve() != Path(opts.resume).resolve():
        raise RuntimeSetupError(f"--resume {opts.resume} appends to that file; drop --output {opts.output} "
                                f"or make it the same file")
    fmt = batch.output_format()
    out = opts.resume or opts.output
    if out is None:
        if batch.errors:
            log.warning("%s; pass -o FILE to get their error lines", describe_errors(batch))
        return replace(opts, output_format=fmt), cluster, batch.requests
    existing = fmt.read(out, missing_ok=True)
    pending = batch.pending_errors(existing)
    if pending:
        with ResultsWriter(out, append=True) as w:
            w.write_lines(_dumps(e.to_output()) for e in pending)
        log.warning("%s; their error lines are in %s", describe_errors(batch), out)
    p = Path(out)
    resume = out if p.exists() and p.stat().st_size > 0 else None
    return replace(opts, output=out, resume=resume, output_format=fmt), cluster, batch.requests


def write_simulated_output(workload: str, path: str | Path, cluster: ClusterSpec, record,
                           limit: int | None = None, seed: int | None = None) -> Path:
    """``simulate -o``: the run's output lines, overwritten.

    For an OpenAI batch workload, OpenAI batch output lines in input order (error lines at their
    line's place), as a finished ``run`` leaves its file; for any other workload, the runtime's
    completion records in request-completion order.
    """
    seqs = sorted((s for s in record.sequences if s.finish_s >= 0), key=lambda s: s.finish_s)
    recs = [CompletionRecord.from_sequence(s) for s in seqs]
    if is_batch_workload(workload):
        batch = check_batch_feasible(read_batch(workload, limit=limit, seed=seed), cluster)
        fmt = batch.output_format()
        with fmt.writer(path) as w:
            w.write_lines(_dumps(e.to_output()) for e in batch.errors)
            w.write(recs)
        fmt.finish(path)
    else:
        with ResultsWriter(path) as w:
            w.write(recs)
    return Path(path)


def output_lines(path: str | Path) -> list[dict]:
    """Every object of an output file (tests, tools)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["BatchInput", "BatchLine", "BatchLineError", "BatchPath", "CHARS_PER_TOKEN",
           "CHAT_MESSAGE_OVERHEAD_TOKENS", "DEFAULT_MAX_TOKENS", "check_batch_feasible", "estimate_tokens",
           "format_error", "format_success", "is_batch_workload", "load_batch_inputs", "parse_line",
           "parse_output_line", "prepare_batch_run", "read_batch", "read_output", "write_simulated_output"]
