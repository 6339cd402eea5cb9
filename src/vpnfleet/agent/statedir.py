"""The agent's state directory: what lives there, and how files are written into it.

One pod's working files (OpenVPN's keys and config, the management socket, the cached
bootstrap and fleet view, the client journal, the spools) live in one directory, owned by the
agent's user and mode 0700, every file in it 0600. That is enforced at every start, also when
the directory already exists (a Kubernetes emptyDir is created 0777) or holds files an older
agent wrote with looser modes. OpenVPN creates its management socket 0777 whatever the umask
(it clears the umask around ``bind``), so the directory is what keeps other users of the pod
away from it; the supervisor also makes the socket 0600 as soon as it appears. Files are written
to a temporary name and renamed, so a crash never leaves a half-written key or config behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vpnfleet.privatefiles import make_private_dir, tighten_tree, write_private

__all__ = ["ServerFiles", "StateDir", "write_private"]


@dataclass(frozen=True)
class ServerFiles:
    """Where one OpenVPN server's config, management socket, pid and log live."""

    conf: Path
    mgmt_socket: Path
    pid_file: Path
    log_file: Path


@dataclass(frozen=True)
class StateDir:
    """Named paths inside the agent's state directory."""

    root: Path

    def create(self) -> None:
        """Create or take over the directory: ours, 0700, every file in it 0600."""
        make_private_dir(self.root)
        tighten_tree(self.root)

    @property
    def conf(self) -> Path:
        return self.root / "server.conf"

    @property
    def mgmt_socket(self) -> Path:
        return self.root / "mgmt.sock"

    def server(self, name: str) -> ServerFiles:
        """The files of one OpenVPN server of the pod ("udp" keeps the names a pod had before
        it ran a TCP server too, so a running UDP openvpn is still adopted after an upgrade)."""
        if name == "udp":
            return ServerFiles(self.conf, self.mgmt_socket, self.root / "openvpn.pid",
                               self.root / "openvpn.log")  # fmt: skip
        return ServerFiles(
            self.root / f"server-{name}.conf",
            self.root / f"mgmt-{name}.sock",
            self.root / f"openvpn-{name}.pid",
            self.root / f"openvpn-{name}.log",
        )

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
    def auth_token(self) -> Path:
        """OpenVPN's auth-gen-token secret (the fleet's; single sign-on sessions)."""
        return self.root / "auth-token.key"

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

    @property
    def bird_conf(self) -> Path:
        """BIRD's main configuration (agent/bird.py), rewritten at every start."""
        return self.root / "bird.conf"

    @property
    def bird_routes(self) -> Path:
        """The routes BIRD announces (an include of :attr:`bird_conf`)."""
        return self.root / "bird-routes.conf"

    @property
    def bird_socket(self) -> Path:
        """BIRD's control socket."""
        return self.root / "bird.ctl"

    @property
    def bird_pid(self) -> Path:
        return self.root / "bird.pid"

    @property
    def bird_log(self) -> Path:
        return self.root / "bird.log"
