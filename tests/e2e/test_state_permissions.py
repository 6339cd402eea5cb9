"""The agent's state directory and OpenVPN's management socket are private, with real openvpn.

Whoever holds the management socket decides every client (and can kill any session), so no
other user of the pod may reach it. OpenVPN 2.6 binds the socket 0777 whatever the umask; a
Kubernetes emptyDir is created 0777. The test starts from exactly that: a world-writable,
world-traversable state directory holding a world-readable key, a real openvpn under the
agent's supervisor, and an unprivileged user trying to connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from vpnfleet.agent.statedir import StateDir
from vpnfleet.agent.supervisor import OpenVPNSupervisor
from vpnfleet.core.mgmt_protocol import ClientEvent

pytestmark = [pytest.mark.e2e()]

# What an unprivileged process in the pod would run to take the management interface over.
CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(type(exc).__name__)
    sys.exit(3)
print("connected")
"""


class NoClients:
    async def prepare(self, adopted: bool, server: str) -> None:
        return None

    async def on_event(self, ev: ClientEvent, server: str) -> None:
        return None


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def as_nobody(socket_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/usr/bin/python3", "-c", CONNECT, str(socket_path)],
        user="nobody",
        group="nogroup",
        capture_output=True,
        text=True,
        timeout=10,
    )


def loose_state_dir(base: Path) -> StateDir:
    """A state dir as an emptyDir and an older agent leave it: everything open to everyone."""
    # Not below pytest's tmp_path: its parents are 0700, which would hide the problem.
    base.chmod(0o755)
    root = base / "state"
    root.mkdir()
    root.chmod(0o777)
    paths = StateDir(root)
    paths.key.write_text("not really a key\n")
    paths.key.chmod(0o644)
    paths.conf.write_text(
        "dev null\nlocal 127.0.0.1\nlport 0\n"
        f"management {paths.mgmt_socket} unix\nmanagement-hold\nverb 3\n"
    )
    return paths


@pytest.mark.asyncio
async def test_other_users_cannot_reach_the_management_socket() -> None:
    base = Path(tempfile.mkdtemp(prefix="vpnf-perm-", dir="/tmp"))
    paths = loose_state_dir(base)
    root = paths.root
    sup = OpenVPNSupervisor(paths)
    task: asyncio.Task[None] | None = None
    try:
        paths.create()
        task = asyncio.create_task(sup.run(NoClients()))
        for _ in range(100):
            if sup.ready:
                break
            await asyncio.sleep(0.1)
        assert sup.ready, "the supervisor did not attach to openvpn"
        assert mode(root) == 0o700
        assert mode(paths.key) == 0o600
        assert mode(paths.conf) == 0o600
        assert mode(paths.mgmt_socket) == 0o600
        assert (root / "openvpn.log").exists() and mode(root / "openvpn.log") == 0o600
        # The agent is attached; a second local user must not even get to knock.
        refused = as_nobody(paths.mgmt_socket)
        assert refused.returncode == 3 and "PermissionError" in refused.stdout, refused

        # Even with the directory loosened again by someone, the socket itself stays closed.
        os.chmod(root, 0o777)
        refused = as_nobody(paths.mgmt_socket)
        assert refused.returncode == 3 and "PermissionError" in refused.stdout, refused
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await sup.stop()
        shutil.rmtree(base, ignore_errors=True)
