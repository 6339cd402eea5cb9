"""A bounded, ordered, on-disk queue of records waiting for the control plane.

Records are JSON lines appended to ``<name>.jsonl``; ``<name>.offset`` holds the byte offset
up to which they have been delivered. The queue lives on disk, not in memory: a long outage
of the control plane fills the disk up to ``max_bytes``, never the agent's memory, and
reading the head back costs one sequential read per batch.

Delivery is at-least-once: a record delivered just before a crash may be sent again, so
every record carries an idempotency key (session uid, flow id). What a crash loses: records
put after the last :meth:`Spool.flush` (the agent flushes at least once a second; a clean
stop flushes everything). A torn last line (a crash mid-write) is cut off at the next start.

When everything is delivered both files are truncated, so a healthy spool stays empty. Under
a load that never quite empties it, the delivered head is cut off (the undelivered rest copied
to a new file) once the head is at least ``compact_bytes`` and the rest is at most that: the
copy stays small, so it never stalls the agent's event loop for long. Disk use is bounded:
undelivered records by ``max_bytes``, the file itself by twice that (records beyond either are
refused and counted in ``dropped``), plus one compaction copy of at most ``compact_bytes``.

``put`` takes a record (serialized here) and ``put_line`` a record already serialized by the
caller (the flow pipeline serializes each record once, for stdout and the spool alike). Lines
are written through a text buffer: for the ASCII JSON both produce, a character is a byte and
the per-record cost is one buffered write.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from vpnfleet.privatefiles import private_opener, tighten

log = logging.getLogger("vpnfleet.agent.spool")


class Spool:
    """FIFO of JSON lines with a size bound; ``put``/``put_line`` report whether it fit."""

    def __init__(
        self,
        directory: Path,
        name: str,
        max_bytes: int = 256 * 1024 * 1024,
        compact_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.path = directory / f"{name}.jsonl"
        self.offset_path = directory / f"{name}.offset"
        self.max_bytes = max_bytes
        self.compact_bytes = compact_bytes
        self.dropped = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._head = 0  # byte offset of the oldest undelivered record
        self._end = 0  # bytes written to the file (flushed or not)
        self._count = 0  # undelivered records
        self._peeked: list[int] = []  # byte lengths of the lines the last peek returned
        self._load()
        self._w: IO[str] = self._writer()
        self._r: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 - lives with the spool

    def _writer(self) -> IO[str]:
        return open(
            self.path,
            "a",
            encoding="utf-8",
            newline="\n",
            buffering=1 << 16,
            opener=private_opener,
        )

    # -- start

    def _load(self) -> None:
        # A compaction interrupted by a crash: its copy is incomplete, the original is intact.
        self.path.with_suffix(".compact").unlink(missing_ok=True)
        # Records name users and their addresses: readable by the agent only.
        if not self.path.exists():
            os.close(private_opener(self.path, os.O_WRONLY | os.O_CREAT))
        tighten(self.path)
        tighten(self.offset_path)
        size = self.path.stat().st_size
        try:
            head = int(self.offset_path.read_text().strip() or 0)
        except (OSError, ValueError):
            head = 0
        if not 0 <= head <= size:
            log.warning(
                "spool %s: offset %d is outside the file; resending it all", self.path, head
            )
            head = 0
        count = 0
        end = head
        with open(self.path, "rb") as fh:
            fh.seek(head)
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # a torn last line from a crash mid-write: cut below
                end += len(line)
                count += 1
        if end < size:
            log.warning("spool %s: cut %d bytes of a torn last line", self.path, size - end)
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
        self._head, self._end, self._count = head, end, count
        if count:
            log.info("spool %s: %d undelivered record(s) from before the restart", self.path, count)
        elif end:
            self.path.write_bytes(b"")
            self._head = self._end = 0
            self._write_offset()

    # -- size

    def __len__(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        """Bytes of undelivered records."""
        return self._end - self._head

    # -- writing

    def put(self, record: dict[str, Any]) -> bool:
        """Queue a record; False (and counted in ``dropped``) if the spool is full."""
        return self.put_line(json.dumps(record, separators=(",", ":"), default=str))

    def put_line(self, line: str) -> bool:
        """Queue one record serialized as a single line of JSON (a final newline is
        optional; there must be no other)."""
        if not line.endswith("\n"):
            line += "\n"
        size = len(line) if line.isascii() else len(line.encode())
        if self._end - self._head + size > self.max_bytes or self._end + size > 2 * self.max_bytes:
            self.dropped += 1
            return False
        self._w.write(line)
        self._end += size
        self._count += 1
        return True

    # -- reading

    def peek_lines(self, limit: int, max_bytes: int | None = None) -> list[str]:
        """The oldest ``limit`` records as JSON text (at least one, then within
        ``max_bytes`` if given), still queued until :meth:`commit`."""
        self._peeked = []
        if not self._count or limit < 1:
            return []
        self._w.flush()  # the reader sees only what reached the OS
        self._r.seek(self._head)
        out: list[str] = []
        total = 0
        for _ in range(min(limit, self._count)):
            raw = self._r.readline()
            if not raw.endswith(b"\n"):
                break  # cannot happen while we own the file; never hand out half a line
            if max_bytes is not None and out and total + len(raw) > max_bytes:
                break
            total += len(raw)
            self._peeked.append(len(raw))
            out.append(raw[:-1].decode("utf-8", errors="replace"))
        return out

    def peek(self, limit: int) -> list[dict[str, Any]]:
        """The oldest ``limit`` records, parsed; an unreadable one comes back as ``{}``."""
        out: list[dict[str, Any]] = []
        for line in self.peek_lines(limit):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                value = None
            if not isinstance(value, dict):
                log.error("spool %s: an unreadable record will be skipped", self.path)
                value = {}
            out.append(value)
        return out

    def commit(self, count: int) -> None:
        """Drop the ``count`` oldest records: they were delivered (they must have been
        returned by the last peek)."""
        if count > len(self._peeked):
            raise ValueError(f"commit({count}) after a peek of {len(self._peeked)}")
        if count <= 0:
            return
        self._head += sum(self._peeked[:count])
        self._count -= count
        self._peeked = self._peeked[count:]
        if not self._count:
            self._truncate()
        elif self._head >= self.compact_bytes and self._end - self._head <= self.compact_bytes:
            self._compact()
        else:
            self._write_offset()

    # -- durability and housekeeping

    def flush(self) -> None:
        """Make queued records durable (called periodically, not per record)."""
        self._w.flush()
        os.fsync(self._w.fileno())
        self._write_offset()

    def _write_offset(self) -> None:
        tmp = self.offset_path.with_suffix(".tmp")
        with open(tmp, "w", opener=private_opener) as fh:
            fh.write(str(self._head))
        os.replace(tmp, self.offset_path)

    def _truncate(self) -> None:
        self._w.flush()
        self._w.truncate(0)  # append mode: the next write goes to the new end, 0
        self._head = self._end = 0
        self._peeked = []
        self._write_offset()

    def _compact(self) -> None:
        """Rewrite the file without its delivered head (crash-safe: write, fsync, rename)."""
        self._w.flush()
        tmp = self.path.with_suffix(".compact")
        with open(self.path, "rb") as src, open(tmp, "wb", opener=private_opener) as dst:
            src.seek(self._head)
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        # Offset 0 first, then the new file: a crash in between resends the delivered head
        # once (at-least-once); the other order could skip undelivered records.
        self._end -= self._head
        self._head = 0
        self._peeked = []
        self._write_offset()
        self._w.close()
        self._r.close()
        os.replace(tmp, self.path)
        self._w = self._writer()
        self._r = open(self.path, "rb")  # noqa: SIM115

    def close(self) -> None:
        self.flush()
        self._w.close()
        self._r.close()
