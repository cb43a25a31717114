"""Per-request completion records as JSON Lines: written as requests finish, read back to resume.

The driver appends one line per finished request and flushes after every batch, so a driver crash
loses nothing already finished; ``--resume FILE`` reads the file back and skips those requests. A
crash can leave a half-written last line: the reader ignores it (the request simply runs again)
and the writer cuts it off before appending, so the file stays one valid object per line.

This module knows one line format, its own records. A workload format (``openai_batch.py``)
plugs in through an ``OutputFormat``: how a record becomes a line (``format``), how a line of
that format reads back (``parse``: a record or an ``ErrorLine``), and what to do with the file
when the run ends (``finalize``, e.g. put it in input order). Nothing here imports the formats.
"""
from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Callable, Iterable, Union

from .errors import HybridRayError

FIELDS = ("id", "replica", "arrival_s", "first_token_s", "finish_s", "prompt_tokens", "output_tokens",
          "preemptions")
OPTIONAL_FIELDS = ("text", "finish_reason")    # a real engine's output; absent from the JSON when None
COUNT_FIELDS = ("cached_tokens",)              # prefix-cache hits; absent from the JSON when 0
SERVER_ERROR = "server_error"   # error code of a request the engine failed on (twice: actors/driver.py)


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
    text: str | None = None             # generated text (a real engine; None: emulated)
    finish_reason: str | None = None    # "stop" | "length" (a real engine; None: emulated)
    cached_tokens: int = 0              # prompt tokens found in the prefix cache (in the JSON only when > 0)

    @classmethod
    def from_sequence(cls, s) -> "CompletionRecord":
        """From a finished ``replica.Sequence`` (its ``completion``, when a real engine ran it)."""
        c = s.completion
        return cls(s.req.id, s.replica, s.req.arrival_s, s.first_token_s, s.finish_s, s.req.prompt_tokens,
                   s.generated, s.preemptions, None if c is None else c.text,
                   None if c is None else c.finish_reason, s.cached_tokens)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in FIELDS}
        for k in OPTIONAL_FIELDS:
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        for k in COUNT_FIELDS:
            if getattr(self, k):
                d[k] = getattr(self, k)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: object, where: str) -> "CompletionRecord":
        if not isinstance(d, dict):
            raise ResultsError(f"{where}: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in FIELDS if k not in d]
        if missing:
            raise ResultsError(f"{where}: missing key(s) {', '.join(missing)}; a record has {', '.join(FIELDS)}")
        try:
            rec = cls(str(d["id"]), str(d["replica"]), float(d["arrival_s"]), float(d["first_token_s"]),
                      float(d["finish_s"]), int(d["prompt_tokens"]), int(d["output_tokens"]), int(d["preemptions"]),
                      *(None if d.get(k) is None else str(d[k]) for k in OPTIONAL_FIELDS),
                      int(d.get("cached_tokens", 0)))
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


Entry = Union[CompletionRecord, ErrorLine]
LineParser = Callable[[dict, str], Entry]     # (a line's object, "FILE line N") -> entry; ResultsError if bad


def plain_error_line(rid: str, code: str, message: str) -> str:
    """A plain results file's line for a request that will not complete (``{"id", "error"}``); read
    back as an ``ErrorLine`` that settles ``rid`` (a resumed run skips it)."""
    return json.dumps({"id": rid, "error": {"code": code, "message": message}}, separators=(",", ":"),
                      ensure_ascii=False)


def _parse_object(obj: object, where: str, parse: LineParser | None) -> Entry:
    """One line's object: ``parse``'s when it takes it (returns non-None), else a completion record
    (or a plain error line, ``plain_error_line``)."""
    if parse is not None and isinstance(obj, dict):
        entry = parse(obj, where)
        if entry is not None:
            return entry
    elif isinstance(obj, dict) and "custom_id" in obj:
        raise ResultsError(f"{where}: an OpenAI batch output line; read the file with its format's parser "
                           f"(openai_batch.read_output)")
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict) and "replica" not in obj:
        err = obj["error"]
        rid = str(obj.get("id", ""))
        return ErrorLine("", rid, str(err.get("code") or ""), str(err.get("message") or ""), None, rid or None)
    return CompletionRecord.from_dict(obj, where)


def read_results(path: str | Path, missing_ok: bool = False, parse: LineParser | None = None) -> ResultsFile:
    """Parse a results file; a malformed line other than an unterminated last one is an error.

    ``parse`` reads the lines of another format (``OutputFormat.parse``): it returns a record or an
    ``ErrorLine``, or None for an object that is a plain record.
    """
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
            rec = _parse_object(obj, f"{p} line {n}", parse)
        except RecursionError:
            if last_partial:
                out.truncated_tail = True
                break
            raise ResultsError(f"{p} line {n}: not a JSON record (nested too deeply)") from None
        except (ValueError, ResultsError) as e:     # UnicodeDecodeError, JSONDecodeError, a huge number
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
            whole = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = False
        if not whole:
            fh.truncate(keep)                   # half a line: gone; the request runs again
            return
        fh.seek(0, 2)
        fh.write(b"\n")                         # a whole record missing only its newline


def _os_reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def check_writable(path: str | Path, option: str = "--output") -> None:
    """Fail now, in one line, if ``path`` cannot be written: before a run starts Ray and plans.

    Checks that no parent is a regular file, that the file (or the folder it will be created in)
    is writable, and writes and flushes one real byte: into a temporary file beside it (a full or
    read-only file system), or, for a device such as /dev/full, into the device itself (a newline,
    which every reader here skips as a blank line). An existing regular file is never modified.
    """
    p = Path(path)
    where = f"{option} {path}"
    if p.is_dir():
        raise ResultsError(f"{where}: is a directory; give a file path")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ResultsError(f"{where}: {ancestor} is a file, not a folder; choose a path outside it")
    if p.exists() and not stat.S_ISREG(p.stat().st_mode):
        if stat.S_ISCHR(p.stat().st_mode):            # /dev/null, /dev/full, a terminal
            try:
                with p.open("a", encoding="utf-8") as fh:
                    fh.write("\n")
                    fh.flush()
            except OSError as e:
                raise ResultsError(f"{where}: cannot write: {_os_reason(e)}") from None
        return                                         # a FIFO: probing would block
    if p.exists():
        try:
            with p.open("a", encoding="utf-8"):
                pass
        except OSError as e:
            raise ResultsError(f"{where}: cannot write: {_os_reason(e)}; choose another file or fix its "
                               f"permissions") from None
    folder = p.parent if p.parent.is_dir() else ancestor
    if not os.access(folder, os.W_OK | os.X_OK):
        if p.exists():
            return                                     # the file is writable in a read-only folder
        raise ResultsError(f"{where}: cannot create it: folder {folder} is not writable")
    try:
        with tempfile.NamedTemporaryFile("wb", dir=folder, prefix=f".{p.name}.", suffix=".probe") as fh:
            fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise ResultsError(f"{where}: cannot write in {folder}: {_os_reason(e)}") from None


class ResultsWriter:
    """Appends records to a JSONL file, flushing after every ``write`` call.

    ``formatter`` turns a record into its line (no newline); default ``CompletionRecord.to_json``.
    An I/O failure (full disk, a path under a file, no permission) is a ResultsError in one line that
    says the file holds what finished before it (``--resume`` continues), raised once.
    """

    def __init__(self, path: str | Path, append: bool = False,
                 formatter: Callable[[CompletionRecord], str] | None = None):
        self.formatter = formatter or CompletionRecord.to_json
        self.path = Path(path)
        self.written = 0
        self._fh: IO[str] | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if append:
                _cut_partial_tail(self.path)
            self._fh = self.path.open("a" if append else "w", encoding="utf-8")
        except OSError as e:
            raise ResultsError(f"{self.path}: cannot open for writing: {_os_reason(e)}") from None

    def _failed(self, e: OSError) -> ResultsError:
        """Drop the handle (its buffer would fail again on close) and say how to continue."""
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass
        return ResultsError(f"{self.path}: cannot write: {_os_reason(e)}; the lines written before stay valid: "
                            f"free space or fix the path, then continue a run with --resume {self.path}")

    def write(self, records: Iterable[CompletionRecord]) -> None:
        assert self._fh is not None, "writer is closed"
        self.write_lines(self.formatter(r) for r in records)

    def write_lines(self, lines: Iterable[str]) -> None:
        """Append lines already formatted (one JSON object each, no newline), then flush."""
        assert self._fh is not None, "writer is closed"
        text = [line + "\n" for line in lines]
        if text:
            try:
                self._fh.write("".join(text))
                self._fh.flush()
            except OSError as e:
                raise self._failed(e) from None
            self.written += len(text)

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as e:
                self._fh = fh
                raise self._failed(e) from None

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def replace_file(path: str | Path, lines: Iterable[str]) -> None:
    """Rewrite ``path`` with ``lines`` atomically (temp file in the same folder, fsync, ``os.replace``):
    a crash leaves the old file or the new one, never a mix."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(p.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """How a run writes and reads back its output file; the default is plain completion records.

    A workload format supplies its own (``openai_batch.BatchInput.output_format``); the runtime and
    the driver use only this object, so they never import the format.
    """

    format: Callable[[CompletionRecord], str] = CompletionRecord.to_json   # record -> line (no newline)
    parse: LineParser | None = None                  # lines of the format -> entries (resume, history)
    finalize: Callable[[Path], None] | None = None   # the run ended: e.g. rewrite the file in input order
    error: Callable[[str, str, str], str] = plain_error_line   # (request id, code, message) -> error line

    def read(self, path: str | Path, missing_ok: bool = False) -> ResultsFile:
        return read_results(path, missing_ok, self.parse)

    def writer(self, path: str | Path, append: bool = False) -> "ResultsWriter":
        return ResultsWriter(path, append, self.format)

    def finish(self, path: str | Path | None) -> None:
        """Apply ``finalize`` to an output file that exists."""
        if path is not None and self.finalize is not None and Path(path).is_file():
            self.finalize(Path(path))


PLAIN = OutputFormat()

assert tuple(f.name for f in fields(CompletionRecord)) == FIELDS + OPTIONAL_FIELDS + COUNT_FIELDS
