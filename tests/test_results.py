"""Results JSONL: round trip, a crash's half-written last line, duplicates, malformed files."""
import json

import pytest

from hybrid_ray.replica import FINISHED, Sequence
from hybrid_ray.results import (FIELDS, CompletionRecord, ResultsError, ResultsWriter, find_duplicates,
                                read_results)
from hybrid_ray.workload import Request


def _rec(i: int, replica: str = "g-0") -> CompletionRecord:
    return CompletionRecord(f"r{i}", replica, 0.5 * i, 0.5 * i + 0.1, 0.5 * i + 2.25, 10 + i, 3 + i, i % 2)


def test_round_trip(tmp_path):
    path = tmp_path / "out" / "res.jsonl"
    recs = [_rec(i) for i in range(5)]
    with ResultsWriter(path) as w:
        w.write(recs[:2])
        w.write([])
        w.write(recs[2:])
        assert w.written == 5
    lines = path.read_text().splitlines()
    assert len(lines) == 5
    assert set(json.loads(lines[0])) == set(FIELDS)
    back = read_results(path)
    assert back.records == recs
    assert back.duplicates == [] and not back.truncated_tail
    assert back.ids == {f"r{i}" for i in range(5)}


def test_flushed_as_written(tmp_path):
    """Each write is on disk before the writer closes (a driver crash loses nothing written)."""
    path = tmp_path / "res.jsonl"
    w = ResultsWriter(path)
    w.write([_rec(1)])
    assert read_results(path).ids == {"r1"}
    w.write([_rec(2)])
    assert read_results(path).ids == {"r1", "r2"}
    w.close()


def test_from_sequence():
    s = Sequence(Request("q", 7, 4, 1.5), 4, status=FINISHED, generated=4, first_token_s=2.0, finish_s=3.0,
                 preemptions=1, replica="a-1")
    assert CompletionRecord.from_sequence(s) == CompletionRecord("q", "a-1", 1.5, 2.0, 3.0, 7, 4, 1)


def test_truncated_last_line_tolerated_and_cut_before_append(tmp_path):
    path = tmp_path / "res.jsonl"
    with ResultsWriter(path) as w:
        w.write([_rec(0), _rec(1)])
    full = _rec(2).to_json()
    with path.open("a") as fh:
        fh.write(full[: len(full) // 2])           # the driver died mid-write
    back = read_results(path)
    assert back.truncated_tail and back.ids == {"r0", "r1"}
    with ResultsWriter(path, append=True) as w:   # resume: the half line goes, new lines stay valid
        w.write([_rec(2), _rec(3)])
    back = read_results(path)
    assert not back.truncated_tail
    assert [r.id for r in back.records] == ["r0", "r1", "r2", "r3"]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "res.jsonl"
    path.write_text(_rec(0).to_json() + "\n" + _rec(1).to_json())
    assert read_results(path).ids == {"r0", "r1"}
    with ResultsWriter(path, append=True) as w:
        w.write([_rec(2)])
    assert [r.id for r in read_results(path).records] == ["r0", "r1", "r2"]


def test_only_line_truncated(tmp_path):
    path = tmp_path / "res.jsonl"
    path.write_text('{"id": "r0", "repl')
    assert read_results(path).records == [] and read_results(path).truncated_tail
    with ResultsWriter(path, append=True) as w:
        w.write([_rec(5)])
    assert path.read_text() == _rec(5).to_json() + "\n"


def test_duplicates_detected_first_kept(tmp_path):
    path = tmp_path / "res.jsonl"
    first, again = _rec(1, "g-0"), _rec(1, "g-1")
    with ResultsWriter(path) as w:
        w.write([_rec(0), first, _rec(2), again, _rec(0)])
    back = read_results(path)
    assert back.duplicates == ["r1", "r0"]
    assert [r.id for r in back.records] == ["r0", "r1", "r2"]
    assert back.records[1].replica == "g-0"
    assert find_duplicates([_rec(0), first, _rec(2), again, _rec(0)]) == ["r1", "r0"]
    assert find_duplicates([_rec(0), _rec(1)]) == []


@pytest.mark.parametrize("line, needle", [
    ("not json", "line 2: not a JSON record"),
    ('{"id": "x"}', "line 2: missing key(s)"),
    ('[1, 2]', "line 2: expected a JSON object"),
    ('{"id": "x", "replica": "a", "arrival_s": "soon", "first_token_s": 1, "finish_s": 2, '
     '"prompt_tokens": 1, "output_tokens": 1, "preemptions": 0}', "line 2: bad value"),
])
def test_malformed_middle_line_is_an_error(tmp_path, line, needle):
    path = tmp_path / "res.jsonl"
    path.write_text(_rec(0).to_json() + "\n" + line + "\n" + _rec(1).to_json() + "\n")
    with pytest.raises(ResultsError) as info:
        read_results(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ResultsError, match="no such results file"):
        read_results(tmp_path / "nope.jsonl")
    assert read_results(tmp_path / "nope.jsonl", missing_ok=True).records == []


def test_blank_lines_ignored(tmp_path):
    path = tmp_path / "res.jsonl"
    path.write_text("\n" + _rec(0).to_json() + "\n\n" + _rec(1).to_json() + "\n")
    assert read_results(path).ids == {"r0", "r1"}


def test_real_engine_fields_round_trip_and_plain_records_stay_plain(tmp_path):
    from hybrid_ray.payload import Completion, Payload, SamplingSpec
    from hybrid_ray.results import OPTIONAL_FIELDS

    req = Request("x", 4, 8, 0.0, Payload((1, 2, 3, 4), SamplingSpec(8, temperature=0.0)))
    s = Sequence(req, 8, status=FINISHED, generated=3, first_token_s=0.1, finish_s=0.4, replica="g-0",
                 completion=Completion([7, 8, 2], "ab ✓", "stop"))
    rec = CompletionRecord.from_sequence(s)
    assert (rec.text, rec.finish_reason, rec.output_tokens) == ("ab ✓", "stop", 3)
    plain = _rec(1)
    assert set(json.loads(plain.to_json())) == set(FIELDS)          # unchanged JSON when None
    assert set(json.loads(rec.to_json())) == set(FIELDS) | set(OPTIONAL_FIELDS)
    path = tmp_path / "r.jsonl"
    with ResultsWriter(path) as w:
        w.write([rec, plain])
    assert read_results(path).records == [rec, plain]


def test_openai_lines_need_their_parser_and_replace_file_is_atomic(tmp_path):
    from hybrid_ray.results import OutputFormat, replace_file

    path = tmp_path / "o.jsonl"
    path.write_text(json.dumps({"id": "b", "custom_id": "c", "response": None, "error": {"code": "x"}}) + "\n")
    with pytest.raises(ResultsError, match="OpenAI batch output line"):
        read_results(path)                                            # results.py knows no other format
    calls = []
    fmt = OutputFormat(parse=lambda obj, where: calls.append(where) or _rec(9), finalize=lambda p: calls.append(p))
    assert fmt.read(path).ids == {"r9"} and calls == [f"{path} line 1"]
    fmt.finish(path)
    fmt.finish(tmp_path / "missing.jsonl")                            # no file: nothing to finalize
    assert calls[-1] == path and len(calls) == 2
    replace_file(path, ["a", "b"])
    assert path.read_text() == "a\nb\n" and [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]
