"""Requests and workload loaders (GSM8K, Azure 2023 traces, any JSONL/CSV)."""
from __future__ import annotations

import csv
import difflib
import json
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hybrid_ray.errors import InfeasibleRequestError, WorkloadError, one_line
from hybrid_ray.payload import Payload
from hybrid_ray.prefix_cache import HASH_BLOCK_TOKENS
from hybrid_ray.promptinfo import PromptInfo, prompt_info

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request.

    ``output_tokens`` is the true generated length (the engine stops there: max_tokens with EOS
    ignored). Policies do not read it unless told lengths are known; they see a prediction.
    With a ``payload`` (a real engine runs the prompt) it is the max_tokens bound instead, and the
    true length is learned when the engine stops the sequence (EOS or a stop string).
    ``info``: what a length predictor may read of the prompt (text, kind, model, system-prompt hash,
    max_tokens; ``PromptInfo``), None for a request known only by its token counts.
    ``hash_ids``: one id per ``HASH_BLOCK_TOKENS`` (512) tokens of the prompt, the last block maybe
    partial (public prefix traces publish them so): two requests share their first k blocks when
    their first k ids agree, which a replica's prefix cache reuses (``prefix_cache.py``). None:
    nothing known to be shared.
    """

    id: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float = 0.0
    payload: Payload | None = None
    info: PromptInfo | None = None
    hash_ids: tuple[int, ...] | None = None


# --- bundled workloads -------------------------------------------------------------------------

BUILTIN_WORKLOADS: tuple[str, ...] = ("gsm8k", "azure-conv", "azure-code", "mixed-tasks", "doc-qa", "few-shot")
AZURE_KINDS: tuple[str, ...] = ("conv", "code")
# prompt / messages / max_tokens / model are features for length predictors (PromptInfo); the
# simulator charges prompt_tokens (counted from the text when absent, ``tokens.count_prompt_tokens``)
FILE_KEYS: tuple[str, ...] = ("id", "prompt_tokens", "output_tokens", "arrival_s", "prompt", "messages",
                              "max_tokens", "model", "hash_ids")
_REQUIRED_KEYS: tuple[str, ...] = ("output_tokens",)
_JSONL_SUFFIXES = (".jsonl", ".json")
_CSV_SUFFIXES = (".csv",)
# Azure 2023 timestamps carry 7 fractional digits ('18:15:46.6805900'); datetime holds 6 and
# Python 3.10's fromisoformat wants exactly 6 (or 3), so the fraction is cut or padded to 6.
_FRACTION = re.compile(r"\.(\d+)")
# Latest arrival accepted (about 31.7 years): beyond it a float time cannot resolve a decode step
# (its spacing passes 1e-7 s), and 1e308 would overflow to inf in the first sum.
MAX_ARRIVAL_S = 1e9


def _data_file(*parts: str) -> Traversable:
    """A file bundled under hybrid_ray/data (works from a source tree, wheel or zip)."""
    return files("hybrid_ray").joinpath("data", *parts)


def _open_bundled_csv(resource: Traversable) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (1-based line number, row) for a bundled CSV with a header row."""
    with resource.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            yield reader.line_num, row


def load_gsm8k(limit: int | None = None) -> list[Request]:
    """The GSM8K test set as LLaMA token counts, all arriving at t=0 (the seed paper's setting).

    prompt = question tokens, output = reference-answer tokens; ``limit`` keeps the first N items.
    """
    _check_limit(limit)
    resource = _data_file("gsm8k", "test_llama_token_counts.csv")
    out: list[Request] = []
    for line, row in _open_bundled_csv(resource):
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append(Request(f"gsm8k-{int(row['idx'])}", int(row["question_tokens"]),
                               int(row["answer_tokens"]), 0.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkloadError(f"{resource} line {line}: malformed row ({exc})") from exc
    return out


def load_gsm8k_questions(limit: int | None = None) -> list[str]:
    """The GSM8K test questions as text (bundled ``test.jsonl``, MIT): real prompts for real engines,
    and the text the offline tiny model's tokenizer is trained on (``engines/tiny_model.py``)."""
    _check_limit(limit)
    out: list[str] = []
    with _data_file("gsm8k", "test.jsonl").open("r", encoding="utf-8") as fh:
        for line in fh:
            if limit is not None and len(out) >= limit:
                break
            if line.strip():
                out.append(json.loads(line)["question"])
    return out


def mixed_task_requests(n: int = 3000, seed: int = 0) -> list[Request]:
    """The mixed-task text workload (``mixed_tasks.py``): ``n`` seeded requests of five task kinds with
    prompt text (``PromptInfo``) and true output lengths, all at t = 0."""
    from . import mixed_tasks

    return [Request(x.id, x.prompt_tokens, x.output_tokens, 0.0, info=x.info) for x in mixed_tasks.lines(n, seed)]


def prefix_requests(lines: Iterable[Any]) -> list[Request]:
    """Requests (at t = 0) from ``prefix_workloads`` lines: token counts and ``hash_ids``, no text."""
    return [Request(x.id, x.prompt_tokens, x.output_tokens, 0.0, hash_ids=x.hash_ids) for x in lines]


def _parse_timestamp(text: str) -> datetime:
    """Parse an Azure TIMESTAMP, truncating sub-microsecond digits datetime cannot hold."""
    text = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text.strip(), count=1)
    return datetime.fromisoformat(text)


def load_azure(kind: str = "conv", limit: int | None = None) -> list[Request]:
    """An Azure LLM inference trace (2023, Splitwise) with its real arrival times.

    ``arrival_s`` is seconds since the file's first TIMESTAMP; prompt = ContextTokens,
    output = GeneratedTokens. A GeneratedTokens of 0 is clamped to 1 because the engine always
    produces at least one token (the prefill emits the first), so a 0-token request cannot be
    replayed faithfully and would break per-token metrics.
    """
    if kind not in AZURE_KINDS:
        raise WorkloadError(f"unknown Azure trace kind {kind!r}: expected one of "
                            f"{', '.join(AZURE_KINDS)}")
    _check_limit(limit)
    resource = _data_file("azure_llm_2023", f"AzureLLMInferenceTrace_{kind}.csv")
    out: list[Request] = []
    t0: datetime | None = None
    for line, row in _open_bundled_csv(resource):
        if limit is not None and len(out) >= limit:
            break
        try:
            ts = _parse_timestamp(row["TIMESTAMP"])
            prompt = int(row["ContextTokens"])
            # Measured: 0 rows have GeneratedTokens == 0 in both bundled files (min is 7 for conv,
            # 6 for code), so the clamp is a guard for other traces of the same schema.
            output = max(1, int(row["GeneratedTokens"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkloadError(f"{resource} line {line}: malformed row ({exc})") from exc
        t0 = ts if t0 is None else t0
        out.append(Request(f"azure-{kind}-{len(out)}", prompt, output, (ts - t0).total_seconds()))
    return out


# --- user files --------------------------------------------------------------------------------

def _token_count(raw: Any, key: str) -> int:
    """An int >= 1 from a JSON number or a CSV/JSON string ("12", "12.0"); else ValueError."""
    value: int | None = None
    if isinstance(raw, bool):
        value = None
    elif isinstance(raw, int):
        value = raw
    elif isinstance(raw, float):
        value = int(raw) if raw.is_integer() else None  # is_integer() is False for NaN/inf
    elif isinstance(raw, str):
        try:
            value = int(raw.strip())
        except ValueError:
            try:
                as_float = float(raw)
            except ValueError:
                as_float = math.nan
            value = int(as_float) if as_float.is_integer() else None
    if value is None or value < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {_short(raw)}")
    return value


def _arrival(raw: Any) -> float:
    """A float in [0, MAX_ARRIVAL_S] (seconds); bools, NaN/inf and huge values are rejected."""
    value = math.nan
    try:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif isinstance(raw, str):
            value = float(raw)
    except (ValueError, OverflowError):
        pass
    if not math.isfinite(value) or not 0 <= value <= MAX_ARRIVAL_S:
        raise ValueError(f"arrival_s must be a number of seconds in [0, {MAX_ARRIVAL_S:g}], got {_short(raw)}")
    return value


def _short(raw: Any, limit: int = 80) -> str:
    """``repr(raw)``, cut to ``limit`` characters (a message stays one readable line)."""
    try:
        text = repr(raw)
    except ValueError:                 # an int too long to print
        text = f"an integer of {raw.bit_length()} bits" if isinstance(raw, int) else type(raw).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _hash_ids(raw: Any) -> tuple[int, ...] | None:
    """A ``hash_ids`` value: a JSON list of integers (a CSV cell holds the list's JSON text); blank: None."""
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            value = None
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ValueError(f"hash_ids must be a list of integers (one per {HASH_BLOCK_TOKENS}-token block of the "
                         f"prompt), got {_short(raw)}")
    return tuple(value) or None


def check_hash_ids(hash_ids: tuple[int, ...] | None, prompt_tokens: int) -> None:
    """ValueError when ``hash_ids`` has more blocks than a prompt of ``prompt_tokens`` tokens holds."""
    if hash_ids is not None and prompt_tokens > 0:
        most = -(-prompt_tokens // HASH_BLOCK_TOKENS)
        if len(hash_ids) > most:
            raise ValueError(f"hash_ids has {len(hash_ids)} entries, but a {prompt_tokens}-token prompt has only "
                             f"{most} block(s) of {HASH_BLOCK_TOKENS} tokens")


def _request_id(raw: Any, default: str) -> str:
    """The given id (str or int), or ``default`` when absent/blank."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    if isinstance(raw, str):
        return raw.strip()
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    raise ValueError(f"id must be a string or an integer, got {_short(raw)}")


def _is_missing(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


def _unknown_key_message(key: str, what: str) -> str:
    hint = difflib.get_close_matches(key, FILE_KEYS, n=1)
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"unknown {what} {key!r} (allowed: {', '.join(FILE_KEYS)}){did_you_mean}"


def _messages_field(raw: Any) -> list[dict]:
    """A chat ``messages`` value: a non-empty list of {role: str, content: str | null} objects."""
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"messages must be a non-empty list of {{role, content}} objects, got {_short(raw)}")
    out = []
    for k, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{k}] must be an object with a string 'role', got {_short(m)}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{k}].content must be a string, got {_short(content)}")
        out.append({"role": m["role"], "content": _clean_text(content or "")})
    return out


def _clean_text(text: str) -> str:
    """Text a tokenizer can take: lone surrogates (valid JSON escapes, invalid UTF-8) replaced."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _record_to_request(record: dict[str, Any], default_id: str, what: str) -> tuple[Request, Any]:
    """Validate one record (keys already checked); ValueError says which field and why. Returns the
    request and, when it has text but no ``prompt_tokens``, the text to count (its prompt_tokens is
    then 0 until counted: ``_build_requests``)."""
    for key in _REQUIRED_KEYS:
        if _is_missing(record.get(key)):
            raise ValueError(f"missing {what} {key!r} (expected an integer >= 1)")
    prompt, messages = record.get("prompt"), record.get("messages")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string (the prompt text), got {type(prompt).__name__} {_short(prompt)}")
    prompt = None if _is_missing(prompt) else _clean_text(prompt)
    messages = None if messages is None or (isinstance(messages, str) and not messages.strip()) \
        else _messages_field(messages)
    if prompt is not None and messages is not None:
        raise ValueError("give 'prompt' (a completion) or 'messages' (a chat), not both")
    text = prompt if prompt is not None else messages
    if _is_missing(record.get("prompt_tokens")) and text is None:
        raise ValueError(f"missing {what} 'prompt_tokens' (an integer >= 1), and no 'prompt' or 'messages' "
                         f"text to count it from")
    output = _token_count(record["output_tokens"], "output_tokens")
    max_tokens = None if _is_missing(record.get("max_tokens")) else _token_count(record["max_tokens"], "max_tokens")
    if max_tokens is not None and output > max_tokens:
        raise ValueError(f"output_tokens {output} exceeds max_tokens {max_tokens} (an engine stops at max_tokens)")
    model = record.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"model must be a string, got {_short(model)}")
    model = "" if model is None else model.strip()
    info = None
    if text is not None or max_tokens is not None or model:
        info = prompt_info(text=prompt, messages=messages, kind="" if text is None else
                           "chat" if messages is not None else "completion", model=model, max_tokens=max_tokens)
    arrival = record.get("arrival_s")
    hash_ids = None if _is_missing(record.get("hash_ids")) else _hash_ids(record["hash_ids"])
    req = Request(
        id=_request_id(record.get("id"), default_id),
        prompt_tokens=0 if _is_missing(record.get("prompt_tokens")) else
        _token_count(record["prompt_tokens"], "prompt_tokens"),
        output_tokens=output,
        arrival_s=0.0 if _is_missing(arrival) else _arrival(arrival),
        info=info,
        hash_ids=hash_ids,
    )
    check_hash_ids(hash_ids, req.prompt_tokens)
    return req, (text if req.prompt_tokens == 0 else None)


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; every problem is a WorkloadError."""
    with path.open("r", encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"{where}: invalid JSON ({exc.msg}); expected one JSON object "
                                    "per line") from exc
            except (ValueError, RecursionError) as exc:   # a 5,000-digit number; [[[[...]]]] nested too deep
                what = "nested too deeply" if isinstance(exc, RecursionError) else one_line(exc)
                raise WorkloadError(f"{where}: invalid JSON ({what}); expected one JSON object per line") from None
            if not isinstance(obj, dict):
                raise WorkloadError(f"{where}: expected a JSON object per line, got "
                                    f"{type(obj).__name__}")
            for key in obj:
                if key not in FILE_KEYS:
                    raise WorkloadError(f"{where}: {_unknown_key_message(key, 'key')}")
            yield line_no, obj


def _csv_header(path: Path, header: list[str] | None) -> list[str]:
    """Check the header row: no unknown, duplicate or missing required columns."""
    if header is None:
        raise WorkloadError(f"{path}: empty file, expected a header row and at least one request")
    names = [name.strip() for name in header]
    for name in names:
        if name not in FILE_KEYS:
            raise WorkloadError(f"{path} line 1: {_unknown_key_message(name, 'column')}")
        if names.count(name) > 1:
            raise WorkloadError(f"{path} line 1: duplicate column {name!r}")
    for key in _REQUIRED_KEYS:
        if key not in names:
            raise WorkloadError(f"{path} line 1: missing column {key!r} (header has: "
                                f"{one_line(', '.join(names))})")
    if "prompt_tokens" not in names and "prompt" not in names:
        raise WorkloadError(f"{path} line 1: missing column 'prompt_tokens' (or a 'prompt' text column to count "
                            f"it from; header has: {one_line(', '.join(names))})")
    return names


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row dict) per non-blank data row; line 1 is the header."""
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        names = _csv_header(path, next(reader, None))
        start = reader.line_num + 1  # a quoted cell may span lines: report where the row starts
        for row in reader:
            line_no, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                raise WorkloadError(f"{path} line {line_no}: expected {len(names)} fields "
                                    f"({', '.join(names)}), got {len(row)}")
            yield line_no, dict(zip(names, row))


def load_file(path: str | Path, tokenizer: Any = None) -> list[Request]:
    """Requests from a JSONL (.jsonl/.json) or CSV (.csv) file, in file order.

    Fields: prompt_tokens, output_tokens (int >= 1), optional id (default ``<stem>-<line>``),
    arrival_s (float >= 0, default 0) and hash_ids (a JSON list of integers, one per 512-token block of
    the prompt, at most ceil(prompt_tokens / 512): the prompt's prefix identity, ``Request.hash_ids``).
    Optional features for length predictors (``PromptInfo``): ``prompt`` (a string) or ``messages``
    (a chat, JSONL only), ``max_tokens`` and ``model``.
    ``prompt_tokens`` is what the simulator charges; a line with text but no ``prompt_tokens`` is
    counted by ``tokenizer`` (``tokens.count_prompt_tokens``: a model's, else the bundled one).
    Unknown keys are errors so typos cannot silently drop a field. Every error is a WorkloadError
    naming the file and its 1-based line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        records, what = _jsonl_records(path), "key"
    elif suffix in _CSV_SUFFIXES:
        records, what = _csv_records(path), "column"
    else:
        raise WorkloadError(f"{path}: unsupported extension {path.suffix!r}; expected "
                            f"{', '.join(_JSONL_SUFFIXES + _CSV_SUFFIXES)}")
    try:
        return _build_requests(path, records, what, tokenizer)
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise WorkloadError(f"{path}: malformed CSV ({exc})") from exc


def _build_requests(path: Path, records: Iterable[tuple[int, dict[str, Any]]],
                    what: str, tokenizer: Any = None) -> list[Request]:
    out: list[Request] = []
    first_line: dict[str, int] = {}
    to_count: list[tuple[int, int, Any]] = []          # (index in out, line, text) of lines to tokenize
    for line_no, record in records:
        where = f"{path} line {line_no}"
        try:
            req, text = _record_to_request(record, f"{path.stem}-{line_no}", what)
        except ValueError as exc:
            raise WorkloadError(f"{where}: {exc}") from exc
        if req.id in first_line:
            raise WorkloadError(f"{where}: duplicate id {req.id!r} (first used on line "
                                f"{first_line[req.id]})")
        first_line[req.id] = line_no
        if text is not None:
            to_count.append((len(out), line_no, text))
        out.append(req)
    if not out:
        raise WorkloadError(f"{path}: no requests (expected at least one row with prompt_tokens "
                            "and output_tokens)")
    if to_count:
        from .tokens import count_prompt_tokens
        try:
            counts = count_prompt_tokens([t for _, _, t in to_count], tokenizer)
        except Exception as exc:                      # a model's tokenizer refusing a text
            raise WorkloadError(f"{path} line {to_count[0][1]}: cannot count the prompt's tokens "
                                f"({one_line(exc)}); give prompt_tokens") from None
        for (k, line_no, _), n in zip(to_count, counts):
            out[k] = replace_request(out[k], prompt_tokens=max(1, int(n)))
            try:
                check_hash_ids(out[k].hash_ids, out[k].prompt_tokens)
            except ValueError as exc:
                raise WorkloadError(f"{path} line {line_no}: {exc} (counted from its text)") from None
    return out


def replace_request(req: Request, **changes: Any) -> Request:
    """``dataclasses.replace`` for a Request (frozen, slots)."""
    import dataclasses
    return dataclasses.replace(req, **changes)


# --- selection ---------------------------------------------------------------------------------

def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise WorkloadError(f"limit must be an integer >= 1, got {limit!r}")


def _select(requests: list[Request], limit: int | None, seed: int | None) -> list[Request]:
    """First ``limit`` requests, or a seeded random sample of that size kept in original order."""
    if limit is None or limit >= len(requests):
        return requests
    if seed is None:
        return requests[:limit]
    picked = sorted(random.Random(seed).sample(range(len(requests)), limit))
    return [requests[i] for i in picked]


def load_workload(spec: str, limit: int | None = None, seed: int | None = None,
                  tokenizer: Any = None) -> list[Request]:
    """Load a named workload (gsm8k, azure-conv, azure-code, mixed-tasks[:N[:SEED]], doc-qa[:N[:SEED]],
    few-shot[:N[:SEED]]: ``prefix_workloads.py``) or a JSONL/CSV file.

    Names win over a same-named file. ``limit`` keeps the first N (or, with ``seed``, a seeded
    sample of N in original order). The result is sorted by arrival_s, stably, so ties keep
    their original order. ``tokenizer``: counts the prompt text of file lines without
    prompt_tokens (``load_file``).
    """
    _check_limit(limit)
    from . import mixed_tasks, prefix_workloads

    sized = mixed_tasks.parse_spec(spec)
    shared = prefix_workloads.parse_spec(spec)
    if sized is not None:
        requests = mixed_task_requests(*sized)
    elif shared is not None:
        requests = prefix_requests(prefix_workloads.lines(*shared))
    elif spec == "gsm8k":
        requests = load_gsm8k(None if seed is not None else limit)
    elif spec in ("azure-conv", "azure-code"):
        requests = load_azure(spec.removeprefix("azure-"), None if seed is not None else limit)
    elif Path(spec).is_file():
        requests = load_file(spec, tokenizer)
    else:
        raise WorkloadError(f"unknown workload {spec!r}: expected one of "
                            f"{', '.join(BUILTIN_WORKLOADS)} (mixed-tasks:N[:SEED], doc-qa:N[:SEED], few-shot:N[:SEED] "
                            f"for another size), or a path "
                            f"to an existing "
                            f"{'/'.join(_JSONL_SUFFIXES + _CSV_SUFFIXES)} file")
    return sorted(_select(requests, limit, seed), key=lambda r: r.arrival_s)


# --- checks and summaries ----------------------------------------------------------------------

def check_feasible(requests: Sequence[Request], kv_capacities: Sequence[int]) -> None:
    """Raise InfeasibleRequestError if some request can never run on any replica.

    ``kv_capacities`` holds each replica group's kv_capacity_tokens. A request needs one group
    that holds its whole KV (prompt + output). The prefill token budget is no limit: a replica
    always admits the first prompt of an iteration whatever its length (vLLM's budget is at
    least the model length). Failing early beats a scheduler that waits forever.
    """
    if not kv_capacities:
        raise ValueError("kv_capacities is empty: no replica group to run requests on")
    max_kv = max(kv_capacities)
    bad = [r for r in requests if r.prompt_tokens + r.output_tokens > max_kv]
    if not bad:
        return
    shown = ", ".join(f"{r.id} ({r.prompt_tokens}+{r.output_tokens}="
                      f"{r.prompt_tokens + r.output_tokens} tokens)" for r in bad[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    raise InfeasibleRequestError(
        f"{len(bad)} request(s) can never run on any replica (prompt+output tokens): "
        f"{shown}{more}; the largest kv_capacity_tokens is {max_kv}: raise it, or drop or "
        f"shorten these requests",
        [r.id for r in bad],
    )


def workload_stats(requests: Sequence[Request]) -> dict[str, float | int]:
    """Count, prompt/output mean, p50, p99 (linear interpolation) and arrival span in seconds."""
    if not requests:
        raise ValueError("workload_stats needs at least one request")
    prompt = np.fromiter((r.prompt_tokens for r in requests), dtype=np.float64, count=len(requests))
    output = np.fromiter((r.output_tokens for r in requests), dtype=np.float64, count=len(requests))
    stats: dict[str, float | int] = {"count": len(requests)}
    for name, values in (("prompt", prompt), ("output", output)):
        p50, p99 = np.percentile(values, [50, 99])
        stats[f"{name}_mean"] = float(values.mean())
        stats[f"{name}_p50"] = float(p50)
        stats[f"{name}_p99"] = float(p99)
    stats["duration_s"] = float(max(r.arrival_s for r in requests))
    return stats
