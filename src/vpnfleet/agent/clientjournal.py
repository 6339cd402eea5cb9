"""The session book's clients on disk, written when they change, so a restarted agent keeps them.

After a crash (kill -9, OOM) OpenVPN and its tunnels carry on and the next agent adopts the
running clients from OpenVPN's status listing. The journal lets it keep each session's uid,
start time and certificate serial, so the control plane sees one session, not a close and a
reopen, and a certificate replaced while the agent was down is still noticed.

Append-only JSON lines, one per change (``up`` when a session becomes live, ``down`` when it
ends), written with line buffering: a line is in the kernel's page cache when the call returns,
which is what surviving a process crash needs (no fsync: a node crash ends the tunnels too).
The file is rewritten atomically when dead lines outnumber live ones. A torn last line (the
process died mid-write) or a malformed one is skipped, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as _json_str
from pathlib import Path
from typing import IO

from vpnfleet.core.sessionbook import Client

log = logging.getLogger("vpnfleet.agent.journal")

COMPACT_SLACK = 1000  # dead lines tolerated beyond the live ones before a rewrite


class ClientJournal:
    """Live sessions of this pod, by uid, mirrored to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._live: dict[str, Client] = {}
        self._lines = 0
        self._fh: IO[str] | None = None

    def load(self) -> dict[tuple[str, str], Client]:
        """The sessions live when the previous agent stopped, by (user, tunnel IP)."""
        self._live.clear()
        self._lines = 0
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("client journal unreadable (%s); adopted sessions get new ids", exc)
            return {}
        bad = 0
        for line in text.splitlines():
            self._lines += 1
            try:
                entry = json.loads(line)
                if entry.get("op") == "down":
                    self._live.pop(str(entry["uid"]), None)
                elif entry.get("op") == "up":
                    client = Client.from_record(entry["client"])
                    self._live[client.uid] = client
                else:
                    raise ValueError("unknown op")
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
        if bad:
            log.warning("client journal: skipped %d malformed line(s)", bad)
        return {(c.user, c.tunnel_ip): c for c in self._live.values()}

    def _writer(self) -> IO[str]:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._fh = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
        return self._fh

    def _append(self, line: str) -> None:
        try:
            self._writer().write(line)
        except OSError as exc:  # a full disk must not stop the VPN; the next rewrite retries
            log.error("client journal write failed: %s", exc)
            return
        self._lines += 1
        if self._lines > 2 * len(self._live) + COMPACT_SLACK:
            self.rewrite(self._live.values())

    def up(self, client: Client) -> None:
        """``client``'s session is live (established or adopted)."""
        self._live[client.uid] = client
        record = json.dumps(client.to_record(), separators=(",", ":"))
        self._append(f'{{"op":"up","client":{record}}}\n')

    def down(self, uid: str) -> None:
        """The session ``uid`` ended."""
        if self._live.pop(uid, None) is not None:
            self._append(f'{{"op":"down","uid":{_json_str(uid)}}}\n')

    def rewrite(self, live: Iterable[Client]) -> None:
        """Replace the file with exactly ``live`` (after adoption, and to drop dead lines)."""
        clients = {c.uid: c for c in live}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                for c in clients.values():
                    fh.write(json.dumps({"op": "up", "client": c.to_record()}) + "\n")
            self.close()
            os.replace(tmp, self.path)
        except OSError as exc:
            log.error("client journal rewrite failed: %s", exc)
            return
        self._live = clients
        self._lines = len(clients)

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError as exc:
                log.error("client journal close failed: %s", exc)
            self._fh = None
