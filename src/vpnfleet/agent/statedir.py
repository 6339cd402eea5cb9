"""The agent's state directory: what lives there, and how files are written into it.

One pod's working files (OpenVPN's keys and config, the management socket, the cached
bootstrap and fleet view, the client journal, the spools) live in one directory, created
0700 and readable by the agent only. Files are written to a temporary name and renamed, so a
crash never leaves a half-written key or config behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` atomically with permission ``mode``."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class StateDir:
    """Named paths inside the agent's state directory."""

    root: Path

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def conf(self) -> Path:
        return self.root / "server.conf"

    @property
    def mgmt_socket(self) -> Path:
        return self.root / "mgmt.sock"

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def key(self) -> Path:
        return self.root / "server.key"

    @property
    def tls_crypt(self) -> Path:
        return self.root / "tls-crypt.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def bootstrap(self) -> Path:
        return self.root / "bootstrap.json"

    @property
    def credential(self) -> Path:
        """The pod's own API credential, received at enrollment (secret, 0600)."""
        return self.root / "pod-credential"

    @property
    def view(self) -> Path:
        return self.root / "view.json"

    @property
    def journal(self) -> Path:
        return self.root / "clients.journal"
