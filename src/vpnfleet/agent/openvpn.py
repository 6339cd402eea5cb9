"""Starting, adopting and stopping the pod's `openvpn` process.

OpenVPN logs to a file the agent tails (not to a pipe), and runs in its own session: if the
agent dies, OpenVPN and its users' tunnels carry on, and the restarted agent adopts the
running process through its management socket instead of starting a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("vpnfleet.agent.openvpn")
ovpn_log = logging.getLogger("openvpn")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_openvpn(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "openvpn"
    except OSError:
        return False


class OpenVPNProcess:
    """One openvpn server process, started by us or adopted from a previous agent."""

    def __init__(
        self,
        binary: str,
        config: Path,
        state_dir: Path,
        *,
        pid_file: Path | None = None,
        log_file: Path | None = None,
        label: str = "",
    ) -> None:
        self.binary = binary
        self.config = config
        self.pid_file = pid_file or state_dir / "openvpn.pid"
        self.log_file = log_file or state_dir / "openvpn.log"
        # Put before each forwarded log line, so the two servers' lines can be told apart.
        self.label = f"[{label}] " if label else ""
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._tail: asyncio.Task[None] | None = None

    def recorded_pid(self) -> int | None:
        """The pid of a still-running openvpn from an earlier agent, if any."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and _is_openvpn(pid) else None

    def adopt(self, pid: int) -> None:
        self.pid = pid
        self._proc = None
        log.info("adopted running openvpn (pid %d)", pid)
        self._start_tail(from_end=True)

    async def start(self) -> None:
        """Start openvpn; it waits on `management-hold` until the agent releases it."""
        self.log_file.touch(mode=0o600, exist_ok=True)
        self._proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--config",
            str(self.config),
            "--writepid",
            str(self.pid_file),
            "--log-append",
            str(self.log_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self._proc.pid
        log.info("started openvpn (pid %d)", self.pid)
        self._start_tail(from_end=True)

    def _start_tail(self, from_end: bool) -> None:
        if self._tail is None or self._tail.done():
            self._tail = asyncio.create_task(self._tail_log(from_end), name="openvpn-log")

    async def _tail_log(self, from_end: bool) -> None:
        """Forward openvpn's log lines to ours (so they reach stdout / the log pipeline)."""
        try:
            fh = open(self.log_file, encoding="utf-8", errors="replace")  # noqa: SIM115
        except OSError:
            return
        with fh:
            if from_end:
                fh.seek(0, os.SEEK_END)
            while True:
                line = fh.readline()
                if line:
                    ovpn_log.info("%s%s", self.label, line.rstrip())
                    continue
                await asyncio.sleep(0.3)
                if fh.tell() > os.path.getsize(self.log_file):  # truncated (rotation)
                    fh.seek(0)

    async def wait(self) -> int:
        """Wait until the process exits; its exit code (-1 when adopted: unknown)."""
        if self._proc is not None:
            return await self._proc.wait()
        while self.pid is not None and _alive(self.pid):
            await asyncio.sleep(0.5)
        return -1

    @property
    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.returncode is None
        return self.pid is not None and _alive(self.pid)

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self.pid is not None and self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.wait(), grace)
            except TimeoutError:
                log.warning("openvpn did not stop within %.0fs; killing it", grace)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                await asyncio.wait_for(self.wait(), 5)
        if self._tail is not None:
            self._tail.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tail
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
