"""podman for the container end-to-end tests: the image built once per run, and a record of
every container, network and volume a test makes, removed afterwards even when it fails.

Everything uses the repository's containers.conf (scripts/podman/containers.conf: runc, the
ulimits this machine allows, netavark) and names starting with ``vfe2e-`` plus a random part,
so concurrent runs and other podman users never collide.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "scripts" / "podman" / "containers.conf"
ENV = {**os.environ, "CONTAINERS_CONF": str(CONF)}


def podman(
    *args: str, check: bool = True, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        ["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and res.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... failed: {res.stderr.strip()}")
    return res


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    seconds: float
    size_bytes: int
    version: str


@pytest.fixture(scope="session")
def vpnfleet_image() -> Iterator[BuiltImage]:
    """The image, built by scripts/build-image.sh once per test run, removed afterwards.

    The Debian base (debootstrap + podman import) and podman's layer cache stay: they are
    caches, like pip's, and make the next run's build take seconds."""
    tag = f"localhost/vpnfleet:vfe2e-{secrets.token_hex(4)}"
    start = time.monotonic()
    res = subprocess.run(
        [str(ROOT / "scripts" / "build-image.sh"), tag],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    seconds = time.monotonic() - start
    if res.returncode != 0:
        pytest.fail(f"building the image failed:\n{res.stdout}\n{res.stderr}", pytrace=False)
    try:
        info = json.loads(podman("image", "inspect", tag).stdout)[0]
        labels = info.get("Labels") or info["Config"].get("Labels") or {}
        yield BuiltImage(
            tag, seconds, int(info["Size"]), labels["org.opencontainers.image.version"]
        )
    finally:
        podman("rmi", "--force", tag, check=False)


@dataclass
class Podman:
    """Makes containers, pods, networks, volumes and secrets; :meth:`cleanup` removes them all."""

    prefix: str = field(default_factory=lambda: f"vfe2e-{secrets.token_hex(3)}")
    containers: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    pods: list[str] = field(default_factory=list)  # made by `podman kube play`
    secrets: list[str] = field(default_factory=list)

    def network(self, role: str, *, internal: bool = False) -> str:
        """A bridge network. An internal one gets no NAT on the host: podman masquerades what
        leaves a network's subnet, also between two of its containers when the host filters
        bridged frames (br_netfilter), so a packet routed to an address outside the subnet
        (a gateway user's) would reach its next hop from the host's address."""
        name = f"{self.prefix}-{role}"
        self.networks.append(name)
        podman("network", "create", *(["--internal"] if internal else []), name)
        return name

    def volume(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        self.volumes.append(name)
        podman("volume", "create", name)
        return name

    def secret(self, name: str, values: dict[str, str]) -> None:
        """(Re)create a podman secret that ``secretKeyRef`` in a played manifest can read: a
        JSON map of base64 values, what a Kubernetes Secret's ``data`` holds."""
        if name not in self.secrets:
            self.secrets.append(name)
        podman("secret", "rm", name, check=False)
        data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
        podman("secret", "create", name, "-", input=json.dumps(data))

    def run(self, role: str, image: str, options: Sequence[str], args: Sequence[str]) -> str:
        """``podman run -d`` a container named PREFIX-ROLE; returns its name."""
        name = f"{self.prefix}-{role}"
        self.containers.append(name)
        podman("run", "-d", "--name", name, *options, image, *args)
        return name

    def exec(self, name: str, *argv: str, env: dict[str, str] | None = None) -> str:
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
        res = podman("exec", *flags, name, *argv, check=False)
        if res.returncode != 0:
            raise AssertionError(f"{argv[0]} in {name} failed: {res.stderr.strip()}")
        return res.stdout

    def inspect(self, name: str) -> dict[str, Any]:
        return dict(json.loads(podman("inspect", name).stdout)[0])

    def state(self, name: str) -> dict[str, Any]:
        return dict(self.inspect(name)["State"])

    def logs(self, name: str) -> str:
        res = podman("logs", name, check=False)
        return res.stdout + res.stderr

    def cleanup(self) -> list[str]:
        """Remove everything made, newest first; returns what could not be removed."""
        left = []
        for name in reversed(self.pods):
            podman("pod", "rm", "--force", "--time", "5", name, check=False, timeout=60)
            if podman("pod", "exists", name, check=False).returncode == 0:
                left.append(f"pod {name}")
        for name in reversed(self.containers):
            podman("rm", "--force", "--time", "5", name, check=False, timeout=60)
            if podman("container", "exists", name, check=False).returncode == 0:
                left.append(f"container {name}")
        for name in reversed(self.volumes):
            podman("volume", "rm", "--force", name, check=False)
            if podman("volume", "exists", name, check=False).returncode == 0:
                left.append(f"volume {name}")
        for name in reversed(self.secrets):
            podman("secret", "rm", name, check=False)
            if podman("secret", "inspect", name, check=False).returncode == 0:
                left.append(f"secret {name}")
        for name in reversed(self.networks):
            podman("network", "rm", "--force", name, check=False)
            if podman("network", "exists", name, check=False).returncode == 0:
                left.append(f"network {name}")
        return left


def wait_for(
    check: Any,
    seconds: float,
    what: str,
    every: float = 0.5,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``seconds``, with what
    ``detail`` says of the state then (routes, logs: what the failure needs to be understood)."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            more = f":\n{detail()}" if detail is not None else ""
            pytest.fail(f"timed out after {seconds}s waiting for {what}{more}", pytrace=False)
        time.sleep(every)
