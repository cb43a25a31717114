"""Per-request completion records as JSON Lines: written as requests finish, read back to resume.

The driver appends one line per finished request and flushes after every batch, so a driver crash
loses nothing already finished; ``--resume FILE`` reads the file back and skips those requests. A
crash can leave a half-written last line: the reader ignores it (the request simply runs again)
and the writer cuts it off before appending, so the file stays one valid object per line.

The reader also understands OpenAI batch output lines (``openai_batch.py``: an object with a
``custom_id``): a success line is a record keyed by its custom_id, an error line an ``ErrorLine``.
The writer takes a ``formatter`` that turns a record into its line (default: ``to_json``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Callable, Iterable

from .errors import HybridRayError

FIELDS = ("id", "replica", "arrival_s", "first_token_s", "finish_s", "prompt_tokens", "output_tokens",
          "preemptions")


class ResultsError(HybridRayError):
    """A results file is malformed (not a truncated last line: that one is tolerated)."""


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """One finished request. Times are modelled seconds on the run's clock (as in ``simulate``)."""

    id: str
    replica: str
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    output_tokens: int
    preemptions: int = 0

    @classmethod
    def from_sequence(cls, s) -> "CompletionRecord":
        """From a finished ``replica.Sequence``."""
        return cls(s.req.id, s.replica, s.req.arrival_s, s.first_token_s, s.finish_s, s.req.prompt_tokens,
                   s.generated, s.preemptions)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: object, where: str) -> "CompletionRecord":
        if not isinstance(d, dict):
            raise ResultsError(f"{where}: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in FIELDS if k not in d]
        if missing:
            raise ResultsError(f"{where}: missing key(s) {', '.join(missing)}; a record has {', '.join(FIELDS)}")
        try:
            rec = cls(str(d["id"]), str(d["replica"]), float(d["arrival_s"]), float(d["first_token_s"]),
                      float(d["finish_s"]), int(d["prompt_tokens"]), int(d["output_tokens"]), int(d["preemptions"]))
        except (TypeError, ValueError) as e:
            raise ResultsError(f"{where}: bad value ({e})") from None
        if not all(math.isfinite(x) for x in (rec.arrival_s, rec.first_token_s, rec.finish_s)):
            raise ResultsError(f"{where}: times must be finite numbers")
        return rec


@dataclass(frozen=True, slots=True)
class ErrorLine:
    """An OpenAI batch error line (``response`` null, ``error`` set) read back from a results file.

    ``settles`` is the request id (custom_id) the line accounts for, so a resumed run skips it;
    None when it accounts for an input *line* only (unparseable line, duplicate custom_id).
    """

    id: str
    custom_id: str
    code: str
    message: str
    line: int | None = None
    settles: str | None = None


@dataclass(slots=True)
class ResultsFile:
    """What a results file holds: the first record of every id, plus what was odd about it."""

    path: str
    records: list[CompletionRecord] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)   # ids seen more than once (first one kept)
    truncated_tail: bool = False                          # a half-written last line was ignored
    errors: list[ErrorLine] = field(default_factory=list)  # OpenAI batch error lines, in file order

    @property
    def ids(self) -> set[str]:
        """Request ids a resumed run skips: every record's, and those settled by an error line."""
        return {r.id for r in self.records} | {e.settles for e in self.errors if e.settles is not None}


def _parse_object(obj: object, where: str) -> "CompletionRecord | ErrorLine":
    """One line's object: an OpenAI batch output line (it has a custom_id) or a completion record."""
    if isinstance(obj, dict) and "custom_id" in obj:
        from .openai_batch import parse_output_line   # imports this module: import here

        return parse_output_line(obj, where)
    return CompletionRecord.from_dict(obj, where)


def read_results(path: str | Path, missing_ok: bool = False) -> ResultsFile:
    """Parse a results file; a malformed line other than an unterminated last one is an error."""
    p = Path(path)
    out = ResultsFile(str(p))
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return out
        raise ResultsError(f"{p}: no such results file") from None
    except OSError as e:
        raise ResultsError(f"{p}: cannot read: {e.strerror or e}") from None
    lines = data.split(b"\n")
    complete_last = data.endswith(b"\n")
    seen: set[str] = set()
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last_partial = n == len(lines) and not complete_last
        try:
            obj = json.loads(raw.decode("utf-8"))
            rec = _parse_object(obj, f"{p} line {n}")
        except (UnicodeDecodeError, json.JSONDecodeError, ResultsError) as e:
            if last_partial:
                out.truncated_tail = True      # the writer died mid-line: that request runs again
                break
            if isinstance(e, ResultsError):
                raise
            raise ResultsError(f"{p} line {n}: not a JSON record ({e}); expected one object per line "
                               f"with {', '.join(FIELDS)}") from None
        if isinstance(rec, ErrorLine):
            out.errors.append(rec)
            continue
        if rec.id in seen:
            out.duplicates.append(rec.id)
            continue
        seen.add(rec.id)
        out.records.append(rec)
    return out


def find_duplicates(records: Iterable[CompletionRecord]) -> list[str]:
    """Ids that occur more than once, in order of their second occurrence."""
    seen: set[str] = set()
    dups: list[str] = []
    for r in records:
        if r.id in seen:
            dups.append(r.id)
        seen.add(r.id)
    return dups


def _cut_partial_tail(p: Path) -> None:
    """Drop an unterminated last line (a write the previous driver did not finish)."""
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with p.open("rb+") as fh:
        fh.seek(-1, 2)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        keep = data.rfind(b"\n") + 1            # 0 when the only line is partial
        tail = data[keep:]
        try:
            _parse_object(json.loads(tail.decode("utf-8")), str(p))
        except (UnicodeDecodeError, json.JSONDecodeError, ResultsError):
            fh.truncate(keep)                   # half a record: gone; the request runs again
            return
        fh.seek(0, 2)
        fh.write(b"\n")                         # a whole record missing only its newline


class ResultsWriter:
    """Appends records to a JSONL file, flushing after every ``write`` call.

    ``formatter`` turns a record into its line (no newline); default ``CompletionRecord.to_json``.
    """

    def __init__(self, path: str | Path, append: bool = False,
                 formatter: Callable[[CompletionRecord], str] | None = None):
        self.formatter = formatter or CompletionRecord.to_json
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append:
            _cut_partial_tail(self.path)
        self._fh: IO[str] | None = self.path.open("a" if append else "w", encoding="utf-8")
        self.written = 0

    def write(self, records: Iterable[CompletionRecord]) -> None:
        assert self._fh is not None, "writer is closed"
        self.write_lines(self.formatter(r) for r in records)

    def write_lines(self, lines: Iterable[str]) -> None:
        """Append lines already formatted (one JSON object each, no newline), then flush."""
        assert self._fh is not None, "writer is closed"
        text = [line + "\n" for line in lines]
        if text:
            self._fh.write("".join(text))
            self._fh.flush()
            self.written += len(text)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


assert tuple(f.name for f in fields(CompletionRecord)) == FIELDS
