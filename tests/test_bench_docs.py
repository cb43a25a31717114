"""`hybrid-ray bench docs`: every marked table in the docs has a generator and back, and a cheap one is up
to date; the rewrite touches only the marked regions, `--check` writes nothing."""
from pathlib import Path

import pytest

from hybrid_ray.bench import docs
from hybrid_ray.bench.docs import DocsError, Table, all_regions, check_registry, find_regions, regenerate
from hybrid_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_every_marker_has_a_generator_and_every_generator_a_marker():
    regions = all_regions(ROOT)
    names = [r.name for r in regions]
    assert sorted(names) == sorted(docs.TABLES)             # one marked region per generator, no strays
    check_registry(regions)                                 # and the timing flags agree
    for r in regions:
        assert r.timing == docs.TABLES[r.name].timing
        assert docs.TABLES[r.name].regenerate_line() in r.body, f"{r.path}: bench:{r.name} lacks its command"
    files = {r.path.relative_to(ROOT).as_posix() for r in regions}
    assert {"README.md", "docs/benchmarks.md", "docs/scheduling.md"} <= files
    assert {n for n, t in docs.TABLES.items() if t.timing} >= {"simscale", "perf", "vs-vllm", "run-vs-simulate"}


def test_the_paper_table_in_the_docs_is_what_the_generator_gives():
    """The cheapest deterministic table (~2 s): run through the registry, exactly as `--check` does."""
    rep = regenerate(ROOT, only=["paper"], check=True, progress=None)
    assert [(o.name, o.status) for o in rep.outcomes] == [("paper", "unchanged")], \
        "docs/benchmarks.md's paper table is stale: run `hybrid-ray bench docs`"


def _fake_root(tmp_path: Path, monkeypatch, body: str = "old") -> Path:
    calls = {"n": 0}

    def make() -> str:
        calls["n"] += 1
        return "| a |\n|---|\n| 1 |"

    monkeypatch.setattr(docs, "TABLES", {"t": Table("t", make, "fake"),
                                         "slow": Table("slow", lambda: "| b |\n|---|\n| 2 |", "fake", timing=True)})
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(f"intro\n\n<!-- bench:t -->\n{body}\n<!-- /bench:t -->\n\nafter\n")
    (tmp_path / "docs" / "x.md").write_text("# x\n<!-- bench:slow timing -->\nmeasured\n<!-- /bench:slow -->\nend\n")
    return tmp_path


def test_rewrite_touches_only_marked_regions_and_skips_timing(tmp_path, monkeypatch):
    root = _fake_root(tmp_path, monkeypatch)
    rep = regenerate(root, progress=None)
    assert rep.names("changed") == ["t"] and rep.names("skipped (timing)") == ["slow"]
    assert (root / "README.md").read_text() == ("intro\n\n<!-- bench:t -->\n| a |\n|---|\n| 1 |\n\n"
                                                "Regenerate: `hybrid-ray bench docs --only t`\n"
                                                "<!-- /bench:t -->\n\nafter\n")
    assert (root / "docs" / "x.md").read_text().count("measured") == 1          # timing table kept as it was
    assert regenerate(root, progress=None).names("unchanged") == ["t"]          # idempotent
    regenerate(root, only=["slow"], progress=None)                             # named: rewritten
    assert "| 2 |" in (root / "docs" / "x.md").read_text()


def test_rewrite_finds_its_regions_again_after_the_file_was_edited_meanwhile(tmp_path, monkeypatch):
    """A table takes minutes; a line added above its region meanwhile must not shift the rewrite
    (it used to replace the opening marker and keep the old last line)."""
    root = _fake_root(tmp_path, monkeypatch, body="old\n\nRegenerate: `hybrid-ray bench docs --only t`")
    readme = root / "README.md"

    def make() -> str:
        readme.write_text(readme.read_text().replace("intro\n", "intro\nedited meanwhile\n"))
        return "| a |\n|---|\n| 1 |"

    monkeypatch.setitem(docs.TABLES, "t", Table("t", make, "fake"))
    assert regenerate(root, progress=None).names("changed") == ["t"]
    assert readme.read_text() == ("intro\nedited meanwhile\n\n<!-- bench:t -->\n| a |\n|---|\n| 1 |\n\n"
                                  "Regenerate: `hybrid-ray bench docs --only t`\n<!-- /bench:t -->\n\nafter\n")
    # a region removed meanwhile: a one-line error, the file left as the editor left it
    monkeypatch.setitem(docs.TABLES, "t", Table("t", lambda: (readme.write_text("gone\n"), "| z |")[1], "fake"))
    with pytest.raises(DocsError, match="bench:t was removed while its table ran"):
        regenerate(root, progress=None)
    assert readme.read_text() == "gone\n"


def test_check_writes_nothing_and_exits_1_listing_stale_tables(tmp_path, monkeypatch, capsys):
    root = _fake_root(tmp_path, monkeypatch)
    before = (root / "README.md").read_text()
    assert main(["bench", "docs", "--check", "--root", str(root)]) == 1
    assert (root / "README.md").read_text() == before
    assert "out of date: t" in capsys.readouterr().err
    assert main(["bench", "docs", "--root", str(root)]) == 0
    assert main(["bench", "docs", "--check", "--root", str(root)]) == 0


def test_bad_markers_and_names_are_one_line_errors(tmp_path, monkeypatch, capsys):
    root = _fake_root(tmp_path, monkeypatch)
    assert main(["bench", "docs", "--only", "nope", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only nope: no such table" in err
    p = tmp_path / "bad.md"
    for text, msg in (("<!-- bench:a -->\nx\n", "has no closing"),
                      ("<!-- bench:a -->\n<!-- bench:b -->\n<!-- /bench:b -->\n<!-- /bench:a -->\n", "opens inside"),
                      ("<!-- /bench:a -->\n", "closes nothing"),
                      ("<!-- bench:a fast -->\n<!-- /bench:a -->\n", "unknown flag 'fast'"),
                      ("<!-- bench:a-->\n", "malformed marker")):
        with pytest.raises(DocsError, match=msg):
            find_regions(p, text)
    (root / "docs" / "y.md").write_text("<!-- bench:t -->\n<!-- /bench:t -->\n")
    with pytest.raises(DocsError, match="already marked"):
        all_regions(root)
    (root / "docs" / "y.md").write_text("<!-- bench:u -->\n<!-- /bench:u -->\n")
    with pytest.raises(DocsError, match="bench:u has no generator"):
        check_registry(all_regions(root))
    (root / "docs" / "y.md").unlink()
    (root / "docs" / "x.md").write_text("<!-- bench:slow -->\n<!-- /bench:slow -->\n")
    with pytest.raises(DocsError, match="expected the marker <!-- bench:slow timing -->"):
        check_registry(all_regions(root))
