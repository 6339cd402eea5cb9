"""Running the dataplane's commands: no shell, optionally inside a named network namespace.

One :class:`CommandRunner` per pod dataplane: every ``ipset``, ``iptables-restore``,
``conntrack``, ``ip`` and ``sysctl`` goes through it, with a timeout, restore text on stdin,
and the process killed if the caller gives up (a half-done restore must never run behind the
next one). Failures are :class:`DataplaneError` with the command's own error text.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass


class DataplaneError(RuntimeError):
    """A dataplane command failed; carries the command name and its stderr."""

    def __init__(self, command: str, returncode: int | None, stderr: str) -> None:
        self.command = command
        self.returncode = returncode
        self.stderr = stderr.strip()
        how = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{command} {how}: {self.stderr or 'no error output'}")


@dataclass
class DataplaneStats:
    """Counters for metrics; read them, do not write them."""

    full_applies: int = 0
    diff_applies: int = 0
    fallbacks: int = 0
    failures: int = 0
    flows_killed: int = 0
    last_apply_seconds: float = 0.0
    last_apply_kind: str = ""
    last_error: str = ""


class CommandRunner:
    """Runs commands in this namespace, or in ``netns`` through ``ip netns exec``."""

    def __init__(self, netns: str | None = None, timeout: float = 30.0) -> None:
        self.netns = netns
        self.timeout = timeout

    async def run(
        self, *argv: str, stdin: str | None = None, ok: Sequence[int] = (0,)
    ) -> tuple[int, str, str]:
        cmd = [*(("ip", "netns", "exec", self.netns) if self.netns else ()), *argv]
        name = argv[0]
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise DataplaneError(name, -1, str(exc)) from exc
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), self.timeout
            )
        except BaseException as exc:
            # Timed out or cancelled: never leave a half-done restore running behind the next
            # apply.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if isinstance(exc, TimeoutError):
                raise DataplaneError(name, None, f"no answer within {self.timeout:.0f}s") from None
            raise
        rc = proc.returncode if proc.returncode is not None else -1
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if rc not in ok:
            raise DataplaneError(name, rc, stderr)
        return rc, stdout, stderr
