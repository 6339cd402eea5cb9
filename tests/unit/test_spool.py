"""The agent's on-disk spool: order, bound, restarts, torn writes, compaction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpnfleet.agent.spool import Spool


def test_survives_restart_and_keeps_order(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "s", max_bytes=10_000)
    for i in range(5):
        assert sp.put({"n": i})
    assert [r["n"] for r in sp.peek(2)] == [0, 1]
    sp.commit(2)
    sp.close()
    again = Spool(tmp_path, "s", max_bytes=10_000)
    assert len(again) == 3
    assert [r["n"] for r in again.peek(10)] == [2, 3, 4]
    again.commit(3)
    assert len(again) == 0 and (tmp_path / "s.jsonl").stat().st_size == 0
    again.close()


def test_bound_and_torn_line(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "b", max_bytes=40)
    assert sp.put({"k": "x" * 10})
    assert not sp.put({"k": "y" * 30})
    assert sp.dropped == 1 and len(sp) == 1
    sp.close()
    with open(tmp_path / "b.jsonl", "a") as fh:
        fh.write('{"k": "tor')  # a crash mid-write
    again = Spool(tmp_path, "b", max_bytes=40)
    assert again.peek(5) == [{"k": "x" * 10}]
    # The torn bytes are gone from the file, so the next record starts on a line of its own.
    assert again.put({"k": "z"})
    again.close()
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"k": "x" * 10}, {"k": "z"}]


def test_put_line_and_byte_bounded_peek(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "f")
    for i in range(10):
        assert sp.put_line(json.dumps({"i": i, "pad": "p" * 90}))
    first = sp.peek_lines(100, max_bytes=350)
    assert [json.loads(x)["i"] for x in first] == [0, 1, 2]
    sp.commit(3)
    # A single record larger than max_bytes still comes out (alone), never blocks the queue.
    assert len(sp.peek_lines(100, max_bytes=10)) == 1
    assert [json.loads(x)["i"] for x in sp.peek_lines(100)] == list(range(3, 10))
    with pytest.raises(ValueError, match="after a peek"):
        sp.commit(8)
    sp.close()


def test_unflushed_records_are_lost_by_a_crash_flushed_ones_are_not(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "c")
    sp.put({"n": 1})
    sp.flush()
    # A crash: the process dies; here the OS still has what flush() wrote.
    again = Spool(tmp_path, "c")
    assert again.peek(5) == [{"n": 1}]
    again.close()


def test_steady_load_compacts_the_delivered_head(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "k", compact_bytes=4096)
    sp.put({"n": 0, "pad": "x" * 100})
    n, sent = 1, []
    for _ in range(300):  # never empty: one record is always left behind
        for _ in range(2):
            sp.put({"n": n, "pad": "x" * 100})
            n += 1
        batch = sp.peek(2)
        sent += [r["n"] for r in batch]
        sp.commit(len(batch))
        assert (tmp_path / "k.jsonl").stat().st_size <= 4096 + 3 * 120
    sp.close()
    again = Spool(tmp_path, "k")
    rest = [r["n"] for r in again.peek(50)]
    assert sent + rest == list(range(n))
    again.close()


def test_the_file_never_outgrows_twice_the_bound(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "g", max_bytes=10_000, compact_bytes=1 << 30)  # never compacts
    line = json.dumps({"pad": "x" * 90})  # 102 bytes with its newline
    accepted = sum(sp.put_line(line) for _ in range(150))
    assert accepted == 98 and sp.dropped == 52  # undelivered bytes bounded by max_bytes
    for _ in range(3):  # deliver a third, refill: the file grows with the delivered head
        sp.commit(len(sp.peek_lines(33)))
        sum(sp.put_line(line) for _ in range(33))
    assert (tmp_path / "g.jsonl").stat().st_size <= 20_000
    assert sp.size_bytes <= 10_000 and sp.dropped > 52
    while batch := sp.peek_lines(100):  # delivered to the end: truncated, accepting again
        sp.commit(len(batch))
    assert (tmp_path / "g.jsonl").stat().st_size == 0 and sp.put_line(line)
    sp.close()


def test_a_compaction_cut_short_by_a_crash_is_cleaned_up(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "c2")
    sp.put({"n": 1})
    sp.close()
    (tmp_path / "c2.compact").write_text('{"n": 0}\n{"half')
    again = Spool(tmp_path, "c2")
    assert again.peek(5) == [{"n": 1}] and not (tmp_path / "c2.compact").exists()
    again.close()


def test_an_offset_outside_the_file_resends_rather_than_skips(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "o")
    sp.put({"n": 1})
    sp.close()
    (tmp_path / "o.offset").write_text("999999")
    again = Spool(tmp_path, "o")
    assert again.peek(5) == [{"n": 1}]
    again.close()
