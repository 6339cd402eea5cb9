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
    sent: list[int] = []
    n = 0
    for _ in range(200):  # never empty: two in, one batch out, one always left behind
        for _ in range(3):
            sp.put({"n": n, "pad": "x" * 100})
            n += 1
        batch = sp.peek(2)
        sent += [r["n"] for r in batch]
        sp.commit(len(batch))
        assert (tmp_path / "k.jsonl").stat().st_size <= 2 * sp.size_bytes + 4096 + 200
    sp.close()
    again = Spool(tmp_path, "k")
    rest = []
    while batch := again.peek(50):
        rest += [r["n"] for r in batch]
        again.commit(len(batch))
    assert sent + rest == list(range(n))
    again.close()


def test_an_offset_outside_the_file_resends_rather_than_skips(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "o")
    sp.put({"n": 1})
    sp.close()
    (tmp_path / "o.offset").write_text("999999")
    again = Spool(tmp_path, "o")
    assert again.peek(5) == [{"n": 1}]
    again.close()
