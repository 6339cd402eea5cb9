"""A bounded, ordered, on-disk queue of records waiting for the control plane.

Records are appended to `<name>.jsonl`; `<name>.offset` says how many lines at its head have
been delivered. Delivery is at-least-once: a record delivered just before a crash may be
sent again, so every record carries an idempotency key (session uid, flow id). What a crash
loses: records put after the last `flush()` (the agent flushes at least once a second).
When everything is delivered both files are truncated, so a healthy spool stays empty.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("vpnfleet.agent.spool")


class Spool:
    """FIFO of JSON records with a size bound; `put` reports whether the record fit."""

    def __init__(self, directory: Path, name: str, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.path = directory / f"{name}.jsonl"
        self.offset_path = directory / f"{name}.offset"
        self.max_bytes = max_bytes
        self.dropped = 0
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._bytes = 0
        self._delivered = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._load()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives with the spool

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            skip = int(self.offset_path.read_text().strip() or 0)
        except (OSError, ValueError):
            skip = 0
        kept = 0
        with open(self.path, encoding="utf-8") as fh:
            for index, line in enumerate(fh):
                if index < skip:
                    continue
                try:
                    self._queue.append(json.loads(line))
                except json.JSONDecodeError:
                    # A torn last line from a crash mid-write: drop it, keep the rest.
                    log.warning("spool %s: skipped an unreadable line %d", self.path, index + 1)
                    continue
                self._bytes += len(line)
                kept += 1
        self._delivered = skip
        if kept:
            log.info("spool %s: %d undelivered record(s) from before the restart", self.path, kept)
        else:
            self._truncate()

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def put(self, record: dict[str, Any]) -> bool:
        """Queue a record; False (and counted in `dropped`) if the spool is full."""
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        if self._bytes + len(line) > self.max_bytes:
            self.dropped += 1
            return False
        self._fh.write(line)
        self._queue.append(record)
        self._bytes += len(line)
        return True

    def peek(self, limit: int) -> list[dict[str, Any]]:
        """The oldest `limit` records, still queued."""
        return [self._queue[i] for i in range(min(limit, len(self._queue)))]

    def commit(self, count: int) -> None:
        """Drop the `count` oldest records: they were delivered."""
        for _ in range(min(count, len(self._queue))):
            record = self._queue.popleft()
            self._bytes -= len(json.dumps(record, separators=(",", ":"), default=str)) + 1
        self._delivered += count
        if not self._queue:
            self._truncate()
        else:
            self._write_offset()

    def flush(self) -> None:
        """Make queued records durable (called periodically, not per record)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._write_offset()

    def _write_offset(self) -> None:
        tmp = self.offset_path.with_suffix(".tmp")
        tmp.write_text(str(self._delivered))
        os.replace(tmp, self.offset_path)

    def _truncate(self) -> None:
        if hasattr(self, "_fh"):
            self._fh.flush()
            self._fh.truncate(0)
            self._fh.seek(0)
        else:
            self.path.write_text("")
        self._delivered = 0
        self._bytes = 0
        self._write_offset()

    def close(self) -> None:
        self.flush()
        self._fh.close()
