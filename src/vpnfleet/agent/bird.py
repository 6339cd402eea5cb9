"""The pod's BGP speaker: a BIRD 2 process, driven through its files and control socket.

:class:`BirdSpeaker` is the real :class:`~vpnfleet.agent.runners.BgpSpeaker`. It writes BIRD's
configuration (``core/birdconf.py``) into the state directory, starts ``bird -f`` with its own
control socket there, and announces a new route set by rewriting the routes include
atomically and asking BIRD to ``configure`` over the socket. BIRD then sends only the changed
routes to its neighbours. Stopping sends ``down``: BIRD closes its sessions with a Cease
notification, so routers drop the pod's routes at once instead of waiting for the hold timer.

A BIRD left running by a previous agent (the agent restarted, the pod did not) is adopted, as
openvpn is: its clients are still connected, so its routes are still right until the new
agent has reconciled them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from pathlib import Path

from vpnfleet.agent.statedir import StateDir
from vpnfleet.core import bgpplan, birdconf

log = logging.getLogger("vpnfleet.agent.bgp")

START_TIMEOUT = 10.0  # for BIRD's control socket to answer after a start
COMMAND_TIMEOUT = 10.0
_REPLY = re.compile(rb"^(\d{4})([ -])(.*)$")


class BgpError(RuntimeError):
    """BIRD could not be started, reached, or did not accept a configuration."""


class BirdControl:
    """A client of BIRD's control socket: one connection per command.

    Replies are lines ``CODE-text`` (more follow), `` text`` (continuation) and ``CODE text``
    (the last); codes from 8000 are errors, 9000 parse errors of the command itself."""

    def __init__(self, path: Path, timeout: float = COMMAND_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    async def command(self, text: str) -> list[tuple[int, str]]:
        """Run ``text``; returns the reply lines as (code, text); BgpError on an error code."""
        try:
            return await asyncio.wait_for(self._command(text), self.timeout)
        except TimeoutError:
            what = text.split()[0]
            raise BgpError(f"BIRD did not answer {what!r} in {self.timeout:.0f}s") from None
        except OSError as exc:
            raise BgpError(f"cannot reach BIRD at {self.path}: {exc.strerror or exc}") from None

    async def _command(self, text: str) -> list[tuple[int, str]]:
        reader, writer = await asyncio.open_unix_connection(str(self.path))
        try:
            await self._read_reply(reader)  # the "0001 BIRD x.y ready." greeting
            writer.write(text.encode() + b"\n")
            await writer.drain()
            lines = await self._read_reply(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        for code, message in lines:
            if code >= 8000:
                raise BgpError(f"BIRD refused {text.split()[0]!r}: {message}")
        return lines

    @staticmethod
    async def _read_reply(reader: asyncio.StreamReader) -> list[tuple[int, str]]:
        lines: list[tuple[int, str]] = []
        code = 0
        while True:
            raw = await reader.readline()
            if not raw:
                raise BgpError("BIRD closed its control socket mid-reply")
            raw = raw.rstrip(b"\n")
            m = _REPLY.match(raw)
            if m:
                code = int(m.group(1))
                lines.append((code, m.group(3).decode(errors="replace")))
                if m.group(2) == b" ":
                    return lines
            else:  # " text": continues the previous code
                lines.append((code, raw[1:].decode(errors="replace")))

    async def answers(self) -> bool:
        """True if a BIRD listens on the socket."""
        try:
            await self.command("show status")
        except BgpError:
            return False
        return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class BirdSpeaker:
    """BIRD in this pod's network namespace, announcing what it is told."""

    def __init__(self, config: birdconf.BgpConfig, paths: StateDir, binary: str = "bird") -> None:
        self.config = config
        self.paths = paths
        self.binary = binary
        self.control = BirdControl(paths.bird_socket)
        self._proc: asyncio.subprocess.Process | None = None
        self._adopted_pid: int | None = None

    def _write_routes(self, routes: bgpplan.Announced) -> None:
        _write_atomic(self.paths.bird_routes, birdconf.render_routes(routes.values()))

    def alive(self) -> bool:
        """True while the BIRD this speaker started or adopted runs."""
        if self._proc is not None:
            return self._proc.returncode is None
        if self._adopted_pid is not None:
            try:
                os.kill(self._adopted_pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return False

    async def start(self, routes: bgpplan.Announced) -> None:
        """Start BIRD announcing exactly ``routes``, or adopt one already running here."""
        _write_atomic(
            self.paths.bird_conf, birdconf.render_config(self.config, self.paths.bird_routes)
        )
        self._write_routes(routes)
        if await self.control.answers():
            await self.control.command("configure")
            self._adopted_pid = self._read_pid()
            self._proc = None
            log.info("adopted the running BIRD (pid %s)", self._adopted_pid)
            return
        self.paths.bird_socket.unlink(missing_ok=True)
        # Handed to the child; opening a local file does not block the loop noticeably.
        logfile = open(self.paths.bird_log, "ab")  # noqa: SIM115, ASYNC230
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.binary, "-f",
                "-c", str(self.paths.bird_conf),
                "-s", str(self.paths.bird_socket),
                "-P", str(self.paths.bird_pid),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                # Its own session: a Ctrl-C meant for the agent must not kill BIRD first; the
                # agent withdraws and stops it in order when it drains.
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise BgpError(f"cannot start BIRD ({self.binary}): {exc.strerror or exc}") from None
        finally:
            logfile.close()
        self._adopted_pid = None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise BgpError(
                    f"BIRD exited with status {self._proc.returncode} at start; "
                    f"see {self.paths.bird_log}"
                )
            if await self.control.answers():
                log.info(
                    "BIRD started (pid %d): AS%d, router id %s, neighbors %s, hold time %ds",
                    self._proc.pid,
                    self.config.asn,
                    self.config.router_id,
                    ", ".join(f"{n.address} AS{n.asn}" for n in self.config.neighbors),
                    self.config.hold_time,
                )
                return
            await asyncio.sleep(0.05)
        raise BgpError(f"BIRD did not open its control socket within {START_TIMEOUT:.0f}s")

    def _read_pid(self) -> int | None:
        try:
            return int(self.paths.bird_pid.read_text().strip())
        except (OSError, ValueError):
            return None

    async def announce(self, routes: bgpplan.Announced) -> None:
        """Make BIRD announce exactly ``routes`` (it sends its neighbours only the changes)."""
        self._write_routes(routes)
        await self.control.command("configure")

    async def established(self) -> int:
        """How many of the BGP sessions are up."""
        lines = await self.control.command("show protocols")
        return sum(1 for _, text in lines if " BGP " in text and "Established" in text)

    async def stop(self, grace: float = 5.0) -> None:
        """Close the sessions (Cease: routers withdraw at once) and end BIRD."""
        with contextlib.suppress(BgpError):
            await self.control.command("down")
        pid = self._proc.pid if self._proc is not None else self._adopted_pid
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            if self._proc is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), 0.1)
            else:
                await asyncio.sleep(0.1)
        if self.alive() and pid is not None:
            log.warning("BIRD (pid %d) did not stop in %.0fs; killing it", pid, grace)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if self._proc is not None:
                await self._proc.wait()
