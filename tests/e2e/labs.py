"""One way for e2e modules to build a lab and always tear it down, however the test ends."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import string
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from vpnfleet.lab import runner, topology
from vpnfleet.lab.runner import LabInfo, LabUser


@contextlib.asynccontextmanager
async def lab_up(
    root: Path, users: Sequence[LabUser], pods: int = 2, letters: str = "vt", **kw: Any
) -> AsyncIterator[LabInfo]:
    """A lab with a random prefix (``letters`` + 3), no client connected yet; on exit it is
    removed and the removal is checked (no leftover namespace, process or error). ``kw`` goes
    to :func:`runner.up` (routing, BGP hold time)."""
    prefix = letters + "".join(secrets.choice(string.ascii_lowercase) for _ in range(3))
    try:
        yield await runner.up(
            prefix, pods=pods, users=tuple(users), state_root=root, connect=False, **kw
        )
    finally:
        # `down` deletes the lab's state directory: keep its logs for a post-mortem (under
        # pytest's temporary directory, which pytest prunes).
        state = root / prefix
        for log in state.rglob("*.log") if state.exists() else ():
            dest = root / f"logs-{prefix}" / log.relative_to(state)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, dest)
        report = await runner.down(prefix, state_root=root)
        assert not report.errors, report.errors
        left = await topology.status(prefix)
        assert not left or not left.namespaces, left
