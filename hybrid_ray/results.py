"""Per-request completion records as JSON Lines: written as requests finish, read back to resume.

The driver appends one line per finished request and flushes after every batch, so a driver crash
loses nothing already finished; ``--resume FILE`` reads the file back and skips those requests. A
crash can leave a half-written last line: the reader ignores it (the request simply runs again)
and the writer cuts it off before appending, so the file stays one valid object per line.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Iterable

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


@dataclass(slots=True)
class ResultsFile:
    """What a results file holds: the first record of every id, plus what was odd about it."""

    path: str
    records: list[CompletionRecord] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)   # ids seen more than once (first one kept)
    truncated_tail: bool = False                          # a half-written last line was ignored

    @property
    def ids(self) -> set[str]:
        return {r.id for r in self.records}


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
            rec = CompletionRecord.from_dict(obj, f"{p} line {n}")
        except (UnicodeDecodeError, json.JSONDecodeError, ResultsError) as e:
            if last_partial:
                out.truncated_tail = True      # the writer died mid-line: that request runs again
                break
            if isinstance(e, ResultsError):
                raise
            raise ResultsError(f"{p} line {n}: not a JSON record ({e}); expected one object per line "
                               f"with {', '.join(FIELDS)}") from None
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
            CompletionRecord.from_dict(json.loads(tail.decode("utf-8")), str(p))
        except (UnicodeDecodeError, json.JSONDecodeError, ResultsError):
            fh.truncate(keep)                   # half a record: gone; the request runs again
            return
        fh.seek(0, 2)
        fh.write(b"\n")                         # a whole record missing only its newline


class ResultsWriter:
    """Appends records to a JSONL file, flushing after every ``write`` call."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append:
            _cut_partial_tail(self.path)
        self._fh: IO[str] | None = self.path.open("a" if append else "w", encoding="utf-8")
        self.written = 0

    def write(self, records: Iterable[CompletionRecord]) -> None:
        assert self._fh is not None, "writer is closed"
        lines = [r.to_json() + "\n" for r in records]
        if lines:
            self._fh.write("".join(lines))
            self._fh.flush()
            self.written += len(lines)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


assert tuple(f.name for f in fields(CompletionRecord)) == FIELDS
