"""The image, built and run here: the control plane and pod agents as plain podman containers.

scripts/build-image.sh builds deploy/Dockerfile on a Debian base made without any registry
(debootstrap + ``podman import``). The control plane runs as its non-root user with no
capability at all; an agent runs with what its Deployment gives it and nothing more:
``--cap-drop ALL --cap-add NET_ADMIN --cap-add NET_RAW``, ``/dev/net/tun``, no privilege
escalation, and its sysctls set when the container is created (``--sysctl``, what the pod's
``securityContext.sysctls`` does) — never ``--privileged``, so its ``/proc/sys`` is read-only
as in a Kubernetes pod. Then a real OpenVPN client (a third container, on the pod network only)
connects through the agent to a backend that only the agent's network reaches.

Every container, network and volume is named ``vfe2e-<random>-...`` and removed even when a
test fails; the image built for the run is removed at the end (the base image and podman's
layer cache stay, as caches).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.podman import BuiltImage, Podman, podman, vpnfleet_image, wait_for
from vpnfleet import __version__
from vpnfleet.agent.sysctls import SYSCTLS

__all__ = ["vpnfleet_image"]  # the session fixture, used here

pytestmark = [pytest.mark.e2e(tools=("podman", "debootstrap")), pytest.mark.timeout(1500)]

CP_URL = "https://vpnfleet-controlplane:8443"
CA_IN_AGENT = "/etc/vpnfleet/controlplane-ca/ca.crt"
# Exactly what deploy/kustomize/base/agent.yaml gives the agent container (test_deploy.py
# checks the manifest side): NET_ADMIN and NET_RAW only, tun, no escalation, root without
# other powers.
AGENT_LEAST_PRIVILEGE = [
    "--user=0",
    "--cap-drop=ALL",
    "--cap-add=NET_ADMIN",
    "--cap-add=NET_RAW",
    "--security-opt=no-new-privileges",
    "--device=/dev/net/tun",
]
SERVE = "python3 -m http.server --directory /opt/vpnfleet --bind 0.0.0.0"
SYSCTL_FLAGS = [f"--sysctl={k}={v}" for k, v in SYSCTLS]


@dataclass
class Fleet:
    pm: Podman
    image: str
    net: str  # the pod network: control plane, agents, clients
    backend_net: str  # the company network behind the pods: only agents are on it
    cp: str
    admin: str  # the control plane's bootstrap admin token
    ca: Path  # the control plane's CA certificate (public), as the ConfigMap would hold it

    def cli(self, *argv: str) -> str:
        """`vpnfleet ...` as an operator, from inside the control plane's container."""
        env = {"VPNFLEET_URL": CP_URL, "VPNFLEET_CA_FILE": "/data/tls/ca.pem"}
        env["VPNFLEET_TOKEN"] = self.admin
        return self.pm.exec(self.cp, "vpnfleet", *argv, env=env)

    def pods(self) -> dict[str, dict[str, object]]:
        return {p["name"]: p for p in json.loads(self.cli("pod", "list", "--json"))}

    def agent(self, name: str, token: str, extra: list[str], networks: list[str]) -> str:
        # Interfaces named in the order given: podman 4.3 assigns eth0, eth1, ... in a random
        # order (a Go map), so "eth1" was the pod network now and then and the agent's NAT
        # (-o eth1) never matched the backend's interface (2 failed clean runs; 2 of 12
        # containers here had their interfaces swapped).
        nets = [f"--network={n}:interface_name=eth{i}" for i, n in enumerate(networks)]
        env = {
            "VPNFLEET_SERVER": CP_URL,
            "VPNFLEET_CA_FILE": CA_IN_AGENT,
            "VPNFLEET_AGENT_TOKEN": token,
            "VPNFLEET_POD_NAME": name,
            "VPNFLEET_UPLINK": "eth1" if len(networks) > 1 else "eth0",
            "VPNFLEET_STATE_DIR": "/run/vpnfleet",
            "VPNFLEET_HEARTBEAT_INTERVAL": "1",
            # The TCP fallback on an unprivileged port, as deploy/ does: binding 443 would need
            # NET_BIND_SERVICE, which the agent does not get.
            "VPNFLEET_TCP_PORT": "1194",
        }
        return self.pm.run(
            name,
            self.image,
            [
                *nets,
                *AGENT_LEAST_PRIVILEGE,
                *extra,
                f"--volume={self.ca}:{CA_IN_AGENT}:ro",
                *(f"--env={k}={v}" for k, v in env.items()),
            ],
            ["agent", "--log-format", "json"],
        )


@pytest.fixture(scope="module")
def fleet(vpnfleet_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    pm = Podman()
    try:
        net = pm.network("pods")
        backend_net = pm.network("backend")
        data = pm.volume("cp-data")
        admin = f"vpf_{secrets.token_hex(24)}"
        cp = pm.run(
            "cp",
            vpnfleet_image.tag,
            [
                f"--network={net}:alias=vpnfleet-controlplane",
                # The test's own CLI calls run in here and reach the server over loopback. Through
                # podman's DNS they failed now and then: aardvark-dns 1.4 (Debian 12) rebinds its
                # sockets on every reload, i.e. whenever a container joins or leaves a network
                # (containers/aardvark-dns#389). The agents still find the control plane by DNS
                # name, and retry, as they would on a cluster.
                "--add-host=vpnfleet-controlplane:127.0.0.1",
                "--cap-drop=ALL",
                "--security-opt=no-new-privileges",
                f"--volume={data}:/data",
                "--env=VPNFLEET_DATA_DIR=/data",
                f"--env=VPNFLEET_SECRET={base64.b64encode(secrets.token_bytes(48)).decode()}",
                f"--env=VPNFLEET_BOOTSTRAP_TOKEN={admin}",
                "--env=VPNFLEET_TLS_SELF_SIGNED=vpnfleet-controlplane",
                "--env=VPNFLEET_PUBLIC_ENDPOINTS=vpn.example.com:1194",
            ],
            ["server", "--listen", "0.0.0.0:8443", "--log-format", "json"],
        )
        ca = tmp_path_factory.mktemp("cp") / "ca.pem"
        f = Fleet(pm, vpnfleet_image.tag, net, backend_net, cp, admin, ca)

        def cp_answers() -> bool:
            if not pm.state(cp)["Running"]:
                pytest.fail(f"the control plane exited:\n{pm.logs(cp)}", pytrace=False)
            try:
                f.pods()
            except AssertionError:
                return False
            return True

        wait_for(cp_answers, 90, "the control plane to answer")
        ca.write_text(pm.exec(cp, "cat", "/data/tls/ca.pem"))
        yield f
    finally:
        left = pm.cleanup()
        assert not left, f"left behind: {left}"


def agent_token(fleet: Fleet, name: str) -> str:
    return str(json.loads(fleet.cli("token", "create", name, "--role", "agent", "--json"))["token"])


def test_the_image_is_small_non_root_and_labelled_with_its_version(
    vpnfleet_image: BuiltImage,
) -> None:
    tag = vpnfleet_image.tag
    printed = podman("run", "--rm", tag, "--version").stdout.strip()
    assert printed == vpnfleet_image.version == __version__
    info = json.loads(podman("image", "inspect", tag).stdout)[0]
    assert info["Config"]["User"] == "10001:10001"
    assert podman("run", "--rm", "--entrypoint", "id", tag, "-u").stdout.strip() == "10001"
    # BIRD 2 for the BGP Component (deploy/kustomize/components/bgp, docs/bgp.md).
    bird = podman("run", "--rm", "--entrypoint", "bird", tag, "--version")
    assert re.search(r"BIRD version 2\.", bird.stdout + bird.stderr), bird
    assert vpnfleet_image.size_bytes < 400_000_000, vpnfleet_image.size_bytes
    print(f"image {tag}: {vpnfleet_image.size_bytes / 1e6:.0f} MB, built in "
          f"{vpnfleet_image.seconds:.0f} s")  # fmt: skip


def test_an_agent_with_two_capabilities_and_its_sysctls_becomes_ready(fleet: Fleet) -> None:
    pm = fleet.pm
    pod = fleet.agent("pod1", agent_token(fleet, "pod1"), SYSCTL_FLAGS, [fleet.net])

    def ready() -> bool:
        if not pm.state(pod)["Running"]:
            pytest.fail(f"the agent exited:\n{pm.logs(pod)}", pytrace=False)
        return bool(fleet.pods().get("pod1", {}).get("ready"))

    wait_for(ready, 120, "pod1 to be ready in the control plane's pod list")
    # Its own probe says so too (what the kubelet's readinessProbe asks).
    probe = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9176/readyz').status)"
    assert pm.exec(pod, "python3", "-c", probe).strip() == "200"
    # Not privileged: two capabilities, and /proc/sys is read-only: the agent did not write
    # the settings, it found them.
    caps = pm.inspect(pod)["EffectiveCaps"]
    assert caps == ["CAP_NET_ADMIN", "CAP_NET_RAW"], caps
    write = podman("exec", pod, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    for key, value in SYSCTLS:
        path = "/proc/sys/" + key.replace(".", "/")
        assert pm.exec(pod, "cat", path).strip() == value, key
    # OpenVPN's tun device and the agent's firewall live in the container's namespace only.
    assert json.loads(pm.exec(pod, "ip", "-j", "link", "show", "tun0"))[0]["ifname"] == "tun0"
    chains = pm.exec(pod, "iptables", "-w", "-S")
    assert "-A FORWARD -j VPNF-FWD" in chains
    host = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=True)
    assert "-A FORWARD -j VPNF-FWD" not in host.stdout


def test_an_agent_without_its_sysctls_names_them_all_and_exits(fleet: Fleet) -> None:
    pm = fleet.pm
    # Forwarding explicitly off (new namespaces here inherit the root's setting), the
    # conntrack settings left at their defaults: all three are wrong and /proc/sys read-only.
    pod = fleet.agent(
        "pod-nosysctl",
        agent_token(fleet, "pod-nosysctl"),
        ["--sysctl=net.ipv4.ip_forward=0"],
        [fleet.net],
    )
    wait_for(lambda: not pm.state(pod)["Running"], 60, "the agent to exit")
    state = pm.state(pod)
    logs = pm.logs(pod)
    assert state["ExitCode"] == 3, logs
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, logs  # one sentence, no traceback
    assert "Traceback" not in logs
    [error] = errors
    for key, value in SYSCTLS:
        assert f"{key}={value} (is 0)" in error
        assert f"--sysctl {key}={value}" in error
    assert "Read-only file system" in error and "securityContext.sysctls" in error
    # It stopped before registering: the control plane never heard of it.
    assert "pod-nosysctl" not in fleet.pods()


def test_a_real_openvpn_client_reaches_a_backend_through_the_agent(
    fleet: Fleet, tmp_path: Path
) -> None:
    pm = fleet.pm
    # A backend on the company network, which only agents are attached to.
    backend = pm.run(
        "backend",
        fleet.image,
        [f"--network={fleet.backend_net}", "--cap-drop=ALL", "--entrypoint=sh"],
        ["-c", f"{SERVE} 8080 & exec {SERVE} 8081"],  # two ports, one of them granted
    )
    backend_ip = address(pm, backend, fleet.backend_net)
    [subnet] = json.loads(podman("network", "inspect", fleet.backend_net).stdout)[0]["subnets"]
    pod = fleet.agent(
        "pod2",
        agent_token(fleet, "pod2"),
        [*SYSCTL_FLAGS, f"--env=VPNFLEET_PUSH_ROUTES={subnet['subnet']}"],
        [fleet.net, fleet.backend_net],  # NAT out of whichever interface leads there
    )

    def ready() -> bool:
        if not pm.state(pod)["Running"]:
            pytest.fail(f"the agent exited:\n{pm.logs(pod)}", pytrace=False)
        return bool(fleet.pods().get("pod2", {}).get("ready"))

    wait_for(ready, 120, "pod2 to be ready")
    # Its uplink (eth1) is where the pushed backend network leaves: no warning about it.
    assert "not the uplink" not in pm.logs(pod), pm.logs(pod)
    # carol may reach the backend's port 8080, nothing else; her profile points at pod2.
    fleet.cli("user", "add", "carol", "--email", "carol@example.com")
    fleet.cli("group", "add", "web")
    fleet.cli("rule", "add", "web", backend_ip, "--proto", "tcp", "--ports", "8080")
    fleet.cli("group", "add-member", "web", "carol")
    profile = fleet.cli("user", "profile", "carol")
    pod_ip = address(pm, pod, fleet.net)
    # Every remote (UDP, then the TCP fallback in its <connection> block) points at pod2,
    # whose TCP server listens on 1194 as in deploy/.
    profile = re.sub(
        r"^remote \S+ \d+( udp| tcp)?$", rf"remote {pod_ip} 1194\1", profile, flags=re.M
    )
    assert f"remote {pod_ip} 1194" in profile, profile
    profile_path = tmp_path / "carol.ovpn"
    profile_path.write_text(profile)
    profile_path.chmod(0o600)
    # The stock OpenVPN client in a container of its own, on the pod network only.
    client = pm.run(
        "client",
        fleet.image,
        [
            f"--network={fleet.net}",
            "--user=0",
            "--cap-drop=ALL",
            "--cap-add=NET_ADMIN",
            "--device=/dev/net/tun",
            f"--volume={profile_path}:/etc/carol.ovpn:ro",
            "--entrypoint=openvpn",
        ],
        ["--config", "/etc/carol.ovpn", "--verb", "3"],
    )
    wait_for(
        lambda: "Initialization Sequence Completed" in pm.logs(client),
        60,
        "carol's tunnel to come up",
    )
    fetch = (
        "import sys, urllib.request as u;"
        "print(u.urlopen(f'http://{sys.argv[1]}:{sys.argv[2]}/', timeout=3).status)"
    )

    assert pm.exec(client, "python3", "-c", fetch, backend_ip, "8080").strip() == "200"
    # The same route leads to the backend's other port, which answers too, but carol has no
    # grant for it: the pod's firewall stops her.
    assert pm.exec(backend, "python3", "-c", fetch, "127.0.0.1", "8081").strip() == "200"
    other = podman("exec", client, "python3", "-c", fetch, backend_ip, "8081", check=False)
    assert other.returncode != 0, other.stdout
    # The control plane knows the session.
    wait_for(
        lambda: (
            [(x["user"], x["pod"]) for x in json.loads(fleet.cli("session", "list", "--json"))]
            == [("carol", "pod2")]
        ),
        20,
        "carol's session on pod2 in the control plane",
    )


def address(pm: Podman, container: str, network: str) -> str:
    return str(pm.inspect(container)["NetworkSettings"]["Networks"][network]["IPAddress"])
