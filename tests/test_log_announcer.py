"""The live Flink source's announcer: each log file announced once, heartbeats, restart, END count."""
from __future__ import annotations

import pytest

from pipelines.log_announcer import END, LogAnnouncer, parse_announcement


def _lines(directory):
    return [parse_announcement(line) for path in sorted(directory.glob("*.tsv")) for line in path.read_text().splitlines()]


def test_each_file_is_announced_once_with_heartbeats_between_and_a_counted_end(tmp_path):
    logs, announce = tmp_path / "logs", tmp_path / "announce"
    for kind in ("impressions", "actions"):
        (logs / kind).mkdir(parents=True)
    clock = iter([10.0, 9.0, 12.0, 13.0, 14.0, 15.0])  # the wall clock may step back: times never do
    announcer = LogAnnouncer(logs, announce, clock=lambda: next(clock))
    (logs / "impressions" / "a.avro").write_bytes(b"x")
    (logs / "impressions" / ".b.avro.tmp").write_bytes(b"x")  # a file still being written
    assert announcer.scan() == 1
    assert announcer.scan() == 0  # nothing new: a heartbeat
    (logs / "actions" / "c.parquet").write_bytes(b"x")
    assert announcer.scan() == 1
    lines = _lines(announce)
    assert [(kind, path.rsplit("/", 1)[-1]) for _, kind, path in lines] == [
        ("impressions", "a.avro"), ("", ""), ("actions", "c.parquet")]
    assert [t for t, _, _ in lines] == [10_000, 10_000, 12_000]
    assert not list(announce.glob(".*"))  # written under a hidden name, then renamed

    (announce / ".000000003.tsv").write_text("11000\timpressions\t/killed/before/rename.avro\n")
    restarted = LogAnnouncer(logs, announce, clock=lambda: next(clock))  # finds what was announced
    assert restarted.scan() == 0 and restarted.lines == 4
    assert restarted.end() == 5  # its last scan (a heartbeat), then END naming the lines before it
    assert _lines(announce)[-1][1:] == (END, "5")
    assert not (announce / ".000000003.tsv").exists()  # a half-done announcement of a killed run is dropped


def test_a_line_with_an_unknown_kind_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="unknown kind 'clicks'"):
        parse_announcement("1\tclicks\t/x.avro\n")
