"""Network namespaces for end-to-end tests: create, wire, run commands in, and always remove.

Usage::

    with NetnsPool("vft-dp-") as pool:          # every namespace gets a random suffix
        gw, cl = pool.create("gw"), pool.create("cl")
        veth(cl, "c0", gw, "tun0")               # both ends created inside the namespaces
        gw.add_addr("tun0", "198.18.8.1/24")
        proc = cl.popen(sys.executable, "-c", SCRIPT)  # killed on exit
        ...
    # processes killed, namespaces (and their veths) deleted, even after a failure

Nothing here touches the root namespace: veth pairs are created directly inside the
namespaces, and only commands prefixed with ``ip netns exec NAME`` run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import pytest


def netns_unavailable(*tools: str) -> str | None:
    """Why namespace tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    return None


def requires_netns(*tools: str) -> pytest.MarkDecorator:
    """Mark an end-to-end test that needs root, `ip` and `tools`.

    Missing requirements fail the test (tests/e2e/conftest.py), they never skip it: a
    silently skipped e2e suite would look green while testing nothing.
    """
    return pytest.mark.e2e(tools=tools)


@dataclass(frozen=True)
class Result:
    """Outcome of a command run in a namespace."""

    returncode: int
    stdout: str
    stderr: str


class Netns:
    """One named network namespace; commands run in it via ``ip netns exec``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._procs: list[subprocess.Popen[str]] = []

    def argv(self, *argv: str) -> list[str]:
        """``argv`` prefixed to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, *argv: str, check: bool = True, input: str | None = None, timeout: float = 15.0
    ) -> Result:
        """Run a command to completion inside the namespace."""
        cp = subprocess.run(
            self.argv(*argv), input=input, capture_output=True, text=True, timeout=timeout
        )
        if check and cp.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} in {self.name} exited {cp.returncode}: {cp.stderr.strip()}"
            )
        return Result(cp.returncode, cp.stdout, cp.stderr)

    async def arun(
        self, *argv: str, check: bool = True, input: str | None = None, time_limit: float = 15.0
    ) -> Result:
        """Like :meth:`run`, without blocking the event loop (killed after ``time_limit`` s)."""
        proc = await asyncio.create_subprocess_exec(
            *self.argv(*argv),
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(input.encode() if input is not None else None), time_limit
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        rc = proc.returncode if proc.returncode is not None else -1
        if check and rc != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.name} exited {rc}: {err.decode()}")
        return Result(rc, out.decode(), err.decode())

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        """Start a long-running process in the namespace (text pipes); killed on cleanup."""
        proc = subprocess.Popen(
            self.argv(*argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._procs.append(proc)
        return proc

    def add_addr(self, ifname: str, cidr: str) -> None:
        """Add an IPv4 address (``a.b.c.d/len``) to an interface."""
        self.run("ip", "addr", "add", cidr, "dev", ifname)

    def add_route(self, dst: str, via: str) -> None:
        """Add a route (``dst`` may be ``default``)."""
        self.run("ip", "route", "add", dst, "via", via)

    def sysctl(self, key: str, value: str) -> None:
        """Set a sysctl inside the namespace."""
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def kill_processes(self) -> None:
        """Kill the processes started here and anything else still running in the namespace."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()
        pids = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=10
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def delete(self) -> None:
        """Kill its processes and delete the namespace (its interfaces go with it)."""
        self.kill_processes()
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, timeout=10)


def veth(a: Netns, a_if: str, b: Netns, b_if: str) -> None:
    """Create a veth pair with one end in each namespace and bring both up."""
    subprocess.run(
        ["ip", "link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if,
         "netns", b.name],
        check=True,
        capture_output=True,
        timeout=10,
    )  # fmt: skip
    a.run("ip", "link", "set", a_if, "up")
    b.run("ip", "link", "set", b_if, "up")


class NetnsPool:
    """Creates namespaces named ``<prefix><random>-<role>`` and removes all of them on exit."""

    def __init__(self, prefix: str) -> None:
        self.base = f"{prefix}{secrets.token_hex(3)}"
        self.namespaces: list[Netns] = []

    def create(self, role: str) -> Netns:
        """Create a namespace with ``lo`` up."""
        ns = Netns(f"{self.base}-{role}")
        subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True, timeout=10)
        self.namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def close(self) -> None:
        """Remove every namespace created here (processes first)."""
        for ns in reversed(self.namespaces):
            with contextlib.suppress(Exception):
                ns.delete()
        self.namespaces.clear()

    def __enter__(self) -> NetnsPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def existing_namespaces(prefix: str) -> Sequence[str]:
    """Names of namespaces starting with ``prefix`` (to assert cleanup)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix)]
