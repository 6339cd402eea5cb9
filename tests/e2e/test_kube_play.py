"""The fleet as the manifests describe it: rendered by Kustomize, run by ``podman kube play``.

There is no Kubernetes cluster here. podman 4.3 plays Deployments, PersistentVolumeClaims and
ConfigMaps as pods, so the control plane and three agent pods run from the rendered output of
``deploy/kustomize/overlays/sysctl-init-container`` (the base plus a privileged init container
that sets the agent's sysctls: podman 4.3 ignores a pod's ``securityContext.sysctls``, the
base's way, so its agents would stop at start naming them). The manifests are used as rendered
except for the few patches in :func:`for_podman`, each one something podman cannot do, with
the reason beside it. Stock OpenVPN clients in containers of their own then connect over UDP
and over TCP, reach a backend only the pods' network reaches, follow a permission change on
both pods they are on, and come back on another pod when theirs is stopped (SIGTERM: drain).
A gateway-mode user keeps its tunnel address towards the backend, and the backend reaches it
back through the route `vpnfleet gateway-routes` keeps via the pod's IP.

Everything is named ``vfe2e-<random>-...`` (pods, containers, networks, volumes, the secret) and
removed even when a test fails.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.podman import ROOT, BuiltImage, Podman, podman, vpnfleet_image, wait_for

__all__ = ["vpnfleet_image"]  # the session fixture, used here

pytestmark = [
    pytest.mark.e2e(tools=("podman", "debootstrap", "kubectl", "catatonit")),
    pytest.mark.timeout(1500),
]

OVERLAY = ROOT / "deploy" / "kustomize" / "overlays" / "sysctl-init-container"
# The Service name the agents are configured with; on podman it is a network alias of the
# control plane's pod (podman has no Services, its DNS answers for aliases).
CP_SERVICE = "vpnfleet-controlplane.vpnfleet.svc"
PLAYED = {"Deployment", "PersistentVolumeClaim"}  # Namespace, Service, NetworkPolicy: no podman
AGENTS = 3
SERVE = "python3 -m http.server --directory /opt/vpnfleet --bind 0.0.0.0"
FETCH = (
    "import sys, urllib.request as u;"
    "print(u.urlopen(f'http://{sys.argv[1]}:{sys.argv[2]}/', timeout=2).status)"
)


def render() -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAY)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def strip_podman_gaps(container: dict[str, Any]) -> None:
    # podman publishes every containerPort on the host, so the second replica's ports collide
    # ("address already in use"); on Kubernetes they only document the pod's ports.
    container.pop("ports", None)
    # podman 4.3 turns a probe's named port into port 0 and runs the probe with curl inside
    # the image; readiness probes it ignores. The test reads readiness from the control plane.
    container.pop("livenessProbe", None)
    container.pop("readinessProbe", None)


def for_podman(
    docs: list[dict[str, Any]], *, image: str, prefix: str, secret: str
) -> dict[str, list[dict[str, Any]]]:
    """The rendered manifests, patched only where podman 4.3 cannot do what Kubernetes does.

    Returns the documents to play per role: "controlplane" and "agent"."""
    out: dict[str, list[dict[str, Any]]] = {"controlplane": [], "agent": []}
    for doc in docs:
        if doc["kind"] not in PLAYED:
            continue
        doc = json.loads(json.dumps(doc))  # a copy
        name = doc["metadata"]["name"]
        # podman's names are global on the host: prefix them so runs never collide.
        doc["metadata"]["name"] = f"{prefix}-{name}"
        doc["metadata"].pop("namespace", None)  # podman has no namespaces
        if doc["kind"] == "PersistentVolumeClaim":
            out["controlplane"].append(doc)
            continue
        spec = doc["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:  # the claim above, renamed
                claim = volume["persistentVolumeClaim"]
                claim["claimName"] = f"{prefix}-{claim['claimName']}"
            if "configMap" in volume:
                # podman keeps a ConfigMap volume as a named volume of the ConfigMap's name.
                volume["configMap"]["name"] = f"{prefix}-{volume['configMap']['name']}"
        if spec.get("initContainers"):
            # podman 4.3 gives init containers the pod's restart policy: with Always (the only
            # one a Deployment allows) the finished init container is started again while
            # podman removes it, and the pod fails to start ("cannot remove container ... as
            # it is running"). OnFailure still restarts a failing agent.
            assert spec.get("restartPolicy", "Always") == "Always"
            spec["restartPolicy"] = "OnFailure"
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            container["image"] = image  # the image built for this run (no registry here)
            strip_podman_gaps(container)
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    # podman's secret of the same content, under this run's name (below).
                    ref["name"] = secret
            # podman 4.3 has no `fieldRef: status.podIP`; without it the agent reads its pod
            # IP from its uplink (the manifest's VPNFLEET_UPLINK, eth0), which the gateway
            # user's route below depends on.
            container["env"] = [
                e
                for e in container.get("env", [])
                if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "status.podIP"
            ]
        role = "agent" if name == "vpnfleet-agent" else "controlplane"
        out[role].append(doc)
    assert [d["kind"] for d in out["agent"]] == ["Deployment"], out["agent"]
    assert sorted(d["kind"] for d in out["controlplane"]) == [
        "Deployment",
        "PersistentVolumeClaim",
    ]
    return out


@dataclass
class Cluster:
    pm: Podman
    image: str
    pods_net: str  # the pod network (control plane, agents) and the company's backend
    internet: str  # where clients are: only the agents' second interface is on it
    admin: str
    cp: str  # the control plane's container
    docs: dict[str, list[dict[str, Any]]]
    secret: str
    tmp: Path
    agents: dict[str, str] = field(default_factory=dict)  # pod name -> agent container

    def cli(self, *argv: str) -> str:
        """`vpnfleet ...` as an operator, from inside the control plane's container (the
        CLI reaches it over loopback: the certificate names localhost too)."""
        env = {
            "VPNFLEET_URL": "https://localhost:8443",
            "VPNFLEET_CA_FILE": "/data/tls/ca.pem",
            "VPNFLEET_TOKEN": self.admin,
        }
        return self.pm.exec(self.cp, "vpnfleet", *argv, env=env)

    def pods(self) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in json.loads(self.cli("pod", "list", "--json"))}

    def play(self, role: str, docs: list[dict[str, Any]], networks: list[str]) -> None:
        """`podman kube play` the documents; remembers the pods for cleanup."""
        path = self.tmp / f"{role}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        for doc in docs:
            if doc["kind"] == "Deployment":
                self.pm.pods.append(f"{doc['metadata']['name']}-pod-0")
            if doc["kind"] == "PersistentVolumeClaim":
                self.pm.volumes.append(doc["metadata"]["name"])
        nets = [arg for net in networks for arg in ("--network", net)]
        res = podman("kube", "play", *nets, str(path), check=False)
        if res.returncode != 0:
            pytest.fail(f"podman kube play {role} failed: {res.stderr.strip()}", pytrace=False)


def container_of(pod: str, container: str) -> str:
    return f"{pod}-{container}"  # podman kube play's naming


@pytest.fixture(scope="module")
def cluster(
    vpnfleet_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is needed to render the manifests", pytrace=False)
    pm = Podman()
    tmp = tmp_path_factory.mktemp("kube")
    try:
        pods_net = pm.network("pods")
        internet = pm.network("internet")
        secret = f"{pm.prefix}-secrets"
        docs = for_podman(render(), image=vpnfleet_image.tag, prefix=pm.prefix, secret=secret)
        admin = f"vpf_{secrets.token_hex(24)}"
        values = {
            "seal-secret": base64.b64encode(secrets.token_bytes(48)).decode(),
            "admin-token": admin,
            "agent-token": "",  # made below, once the control plane runs (deploy/README.md)
        }
        pm.secret(secret, values)
        c = Cluster(pm, vpnfleet_image.tag, pods_net, internet, admin, "", docs, secret, tmp)
        # The Service's name resolves to the control plane's pod, as cluster DNS would.
        c.play("controlplane", docs["controlplane"], [f"{pods_net}:alias={CP_SERVICE}"])
        [deployment] = [d for d in docs["controlplane"] if d["kind"] == "Deployment"]
        c.cp = container_of(f"{deployment['metadata']['name']}-pod-0", "controlplane")

        def cp_answers() -> bool:
            if not pm.state(c.cp)["Running"]:
                pytest.fail(f"the control plane exited:\n{pm.logs(c.cp)}", pytrace=False)
            try:
                c.pods()
            except AssertionError:
                return False
            return True

        wait_for(cp_answers, 90, "the control plane to answer")
        # What deploy/README.md tells the operator to do next: the enrollment token into the
        # Secret, the control plane's CA into the agents' ConfigMap.
        token = json.loads(c.cli("token", "create", "enroll", "--role", "agent", "--json"))
        pm.secret(secret, {**values, "agent-token": token["token"]})
        ca = pm.exec(c.cp, "cat", "/data/tls/ca.pem")
        configmap: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{pm.prefix}-vpnfleet-controlplane-ca"},
            "data": {"ca.crt": ca},
        }
        [agent] = docs["agent"]
        pm.volumes.append(configmap["metadata"]["name"])
        for i in range(AGENTS):
            # One replica per play, so that each gets a state volume of its own (below).
            replica = json.loads(json.dumps(agent))
            replica["metadata"]["name"] = f"{agent['metadata']['name']}-{i}"
            replica["spec"]["replicas"] = 1
            # podman 4.3 makes an emptyDir a named volume called after the volume, shared by
            # every pod that names it: the agents would share one state directory (and one
            # pod credential). Each replica gets its own name, as each Kubernetes pod gets
            # its own emptyDir.
            spec = replica["spec"]["template"]["spec"]
            for volume in spec["volumes"]:
                if "emptyDir" in volume:
                    own = f"{pm.prefix}-{volume['name']}-{i}"
                    for ctr in [*spec.get("initContainers", []), *spec["containers"]]:
                        for mount in ctr.get("volumeMounts", []):
                            if mount["name"] == volume["name"]:
                                mount["name"] = own
                    volume["name"] = own
                    pm.volumes.append(own)
            # eth0 on the pod network (the manifest's VPNFLEET_UPLINK), eth1 where clients are;
            # named, since podman does not keep the order of a pod's networks.
            c.play(
                f"agent-{i}",
                [configmap, replica],
                [f"{pods_net}:interface_name=eth0", f"{internet}:interface_name=eth1"],
            )
            pod = f"{replica['metadata']['name']}-pod-0"
            c.agents[pod] = container_of(pod, "agent")
        yield c
    finally:
        left = pm.cleanup()
        assert not left, f"left behind: {left}"


def address(pm: Podman, container: str, network: str) -> str:
    return str(pm.inspect(container)["NetworkSettings"]["Networks"][network]["IPAddress"])


def profile_for(c: Cluster, user: str, pods: list[str]) -> Path:
    """The user's profile from the control plane, its remotes pointed at the given pods.

    podman has no Service or load balancer: each `<connection>` block of the profile (UDP
    first, then the TCP fallback) becomes one block per pod, in the given order."""
    profile = c.cli("user", "profile", user)
    blocks = re.findall(r"<connection>\n.*?</connection>\n", profile, flags=re.S)
    assert len(blocks) == 2 and " udp\n" in blocks[0] and " tcp\n" in blocks[1], profile
    ips = [address(c.pm, c.agents[p], c.internet) for p in pods]
    # deploy/: the TCP server listens on 1194 in the pod (the Service maps 443 to it).
    per_pod = "".join(
        re.sub(r"^remote \S+ \d+ ", f"remote {ip} 1194 ", block, flags=re.M)
        for block in blocks
        for ip in ips
    )
    profile = profile.replace(blocks[0], "").replace(blocks[1], per_pod)
    path = c.tmp / f"{user}.ovpn"
    path.write_text(profile)
    path.chmod(0o600)
    return path


def start_client(c: Cluster, user: str, profile: Path, *, block_udp: bool) -> str:
    """A stock OpenVPN client in a container on the clients' network only."""
    script = "exec openvpn --config /etc/client.ovpn --verb 3"
    if block_udp:
        # This client's network drops UDP: it must fall back to the profile's TCP blocks.
        script = "iptables -w -A OUTPUT -p udp --dport 1194 -j DROP && " + script
    return c.pm.run(
        f"client-{user}",
        c.image,
        [
            f"--network={c.internet}",
            "--user=0",
            "--cap-drop=ALL",
            "--cap-add=NET_ADMIN",
            "--cap-add=NET_RAW",
            "--device=/dev/net/tun",
            f"--volume={profile}:/etc/client.ovpn:ro",
            "--entrypoint=sh",
        ],
        ["-c", script],
    )


def reaches(c: Cluster, client: str, host: str, port: int) -> bool:
    res = podman("exec", client, "python3", "-c", FETCH, host, str(port), check=False)
    return res.returncode == 0 and res.stdout.strip() == "200"


def wait_sessions(c: Cluster, expected: dict[str, list[str]], what: str) -> None:
    """Poll the control plane's live sessions until they are ``expected`` (20 s at most)."""
    seen: list[dict[str, list[str]]] = []

    def check() -> bool:
        seen.append(sessions(c))
        return seen[-1] == expected

    try:
        wait_for(check, 20, f"live sessions: {what}")
    except pytest.fail.Exception:
        pytest.fail(f"live sessions: {what}; last seen {seen[-1]}", pytrace=False)


def diagnose(c: Cluster, client: str, pod: str) -> str:
    """What a failed reachability check needs to be understood: routes and firewall."""
    parts = []
    for name, argv in (
        (client, ["ip", "route"]),
        (client, ["ip", "-br", "addr"]),
        (c.agents[pod], ["ip", "route"]),
        (c.agents[pod], ["ip", "-br", "addr"]),
        (c.agents[pod], ["iptables-save"]),
        (c.agents[pod], ["ipset", "list", "-terse"]),
    ):
        res = podman("exec", name, *argv, check=False)
        parts.append(f"--- {name}: {' '.join(argv)}\n{res.stdout}{res.stderr}")
    return "\n".join(parts)


def sessions(c: Cluster) -> dict[str, list[str]]:
    """user -> pods of the user's live sessions, from the control plane."""
    out: dict[str, list[str]] = {}
    for s in json.loads(c.cli("session", "list", "--active", "--json")):
        out.setdefault(s["user"], []).append(s["pod"])
    return out


def test_the_manifests_run_and_clients_connect_follow_permissions_and_survive_a_drain(
    cluster: Cluster,
) -> None:
    c, pm = cluster, cluster.pm
    pods = sorted(c.agents)

    def all_ready() -> bool:
        for pod, container in c.agents.items():
            if not pm.state(container)["Running"]:
                pytest.fail(f"agent {pod} exited:\n{pm.logs(container)}", pytrace=False)
        listed = c.pods()
        return all(listed.get(p, {}).get("ready") for p in pods)

    start = time.monotonic()
    wait_for(all_ready, 180, "all agent pods to be ready in the control plane's pod list")
    print(f"\nagents ready {time.monotonic() - start:.1f} s after their plays")

    # The company's backend, on the pod network: port 8080 granted, 8081 not (yet).
    # It also runs `vpnfleet gateway-routes` (the static networks' way to route gateway users;
    # NET_ADMIN for its `ip route`), which pins the control plane's CA and reaches it by the
    # Service's name (/etc/hosts here: aardvark-dns 1.4 drops queries while networks change).
    ca = c.tmp / "cp-ca.pem"
    ca.write_text(pm.exec(c.cp, "cat", "/data/tls/ca.pem"))
    backend = pm.run(
        "backend",
        c.image,
        [
            f"--network={c.pods_net}",
            "--cap-drop=ALL",
            "--cap-add=NET_ADMIN",
            f"--add-host={CP_SERVICE}:{address(pm, c.cp, c.pods_net)}",
            f"--volume={ca}:/etc/cp-ca.pem:ro",
            "--entrypoint=sh",
        ],
        ["-c", f"{SERVE} 8080 & exec {SERVE} 8081"],
    )
    backend_ip = address(pm, backend, c.pods_net)
    routes_token = json.loads(c.cli("token", "create", "routes", "--role", "auditor", "--json"))
    podman(
        "exec",
        "-d",
        f"--env=VPNFLEET_ROUTES_TOKEN={routes_token['token']}",
        backend,
        "vpnfleet",
        "gateway-routes",
        "--server",
        f"https://{CP_SERVICE}:8443",
        "--ca-file",
        "/etc/cp-ca.pem",
    )
    # The manifest pushes 10.0.0.0/8 (a placeholder for the company's networks); podman's
    # networks are there too.
    assert backend_ip.startswith("10."), backend_ip
    c.cli("group", "add", "web")
    c.cli("rule", "add", "web", backend_ip, "--proto", "tcp", "--ports", "8080")
    for user in ("carol", "dave", "erin"):
        mode = ["--mode", "gateway"] if user == "erin" else []
        c.cli("user", "add", user, "--email", f"{user}@example.com", *mode)
        c.cli("group", "add-member", "web", user)

    # carol over UDP, first to pod 0 (then 1, 2); dave's network drops UDP: TCP, pod 1 first.
    carol = start_client(c, "carol", profile_for(c, "carol", pods), block_udp=False)
    dave = start_client(
        c, "dave", profile_for(c, "dave", [pods[1], pods[2], pods[0]]), block_udp=True
    )
    # erin, gateway mode, over UDP to pod 2 first.
    erin = start_client(c, "erin", profile_for(c, "erin", [pods[2], pods[0]]), block_udp=False)
    for client in (carol, dave, erin):
        wait_for(
            lambda client=client: "Initialization Sequence Completed" in pm.logs(client),
            90,
            f"{client}'s tunnel",
        )
    wait_sessions(
        c,
        {"carol": [pods[0]], "dave": [pods[1]], "erin": [pods[2]]},
        "carol on pod 0, dave on pod 1, erin on pod 2",
    )
    assert "TCP connection established" in pm.logs(dave)  # the fallback
    assert "TCP connection established" not in pm.logs(carol)
    for client, pod in ((carol, pods[0]), (dave, pods[1])):
        assert reaches(c, client, backend_ip, 8080), diagnose(c, client, pod)
        assert not reaches(c, client, backend_ip, 8081)  # no grant: the pod's firewall
    # erin's answers need the backend's route back to her, which gateway-routes adds when it
    # hears of her session (within a second or so).
    wait_for(lambda: reaches(c, erin, backend_ip, 8080), 10, "erin reaching the backend")
    assert not reaches(c, erin, backend_ip, 8081)

    # Gateway mode: the pod found its own IP (no status.podIP under podman), the backend saw
    # erin's tunnel address (no NAT) and reaches erin back on it, via pod 2.
    pod2_ip = address(pm, c.agents[pods[2]], c.pods_net)
    assert c.pods()[pods[2]]["pod_ip"] == pod2_ip
    [erin_session] = [
        s for s in json.loads(c.cli("session", "list", "--active", "--json")) if s["user"] == "erin"
    ]
    erin_ip = erin_session["tunnel_ip"]
    assert f"{erin_ip} - - [" in pm.logs(backend), pm.logs(backend)[-2000:]
    podman("exec", "-d", erin, "python3", "-m", "http.server", "--bind", erin_ip, "8090")
    t0 = time.monotonic()
    wait_for(lambda: reaches(c, backend, erin_ip, 8090), 20, "the backend reaching erin back")
    print(f"backend reaches gateway user erin {time.monotonic() - t0:.2f} s after her server")
    route = podman("exec", backend, "ip", "route", "show", f"{erin_ip}/32").stdout
    assert f"via {pod2_ip}" in route, route

    # A permission change reaches both pods: a grant...
    t0 = time.monotonic()
    c.cli("rule", "add", "web", backend_ip, "--proto", "tcp", "--ports", "8081")
    for client in (carol, dave):
        wait_for(lambda client=client: reaches(c, client, backend_ip, 8081), 10, "the grant")
    print(f"grant enforced on both pods within {time.monotonic() - t0:.2f} s")
    # ...and a revocation, for carol only.
    t0 = time.monotonic()
    c.cli("group", "remove-member", "web", "carol")
    wait_for(lambda: not reaches(c, carol, backend_ip, 8080), 10, "carol's revocation")
    print(f"revocation enforced within {time.monotonic() - t0:.2f} s")
    assert reaches(c, dave, backend_ip, 8080)
    assert reaches(c, backend, erin_ip, 8090)
    c.cli("group", "add-member", "web", "carol")
    wait_for(lambda: reaches(c, carol, backend_ip, 8080), 10, "carol's grant back")

    # Stopping carol's pod (SIGTERM, as a node drain or rollout does) drains it: carol is told
    # to reconnect and lands on the next pod of her profile; the stopped pod's session closes.
    # The agent container is stopped, not the podman pod: `podman pod stop` takes the pod's
    # network down while its containers still run (carol would never hear the drain), where
    # Kubernetes keeps a pod's network until its last container has exited.
    t0 = time.monotonic()
    podman("stop", "--time", "30", c.agents[pods[0]], timeout=60)
    stop_seconds = time.monotonic() - t0
    assert pm.state(c.agents[pods[0]])["ExitCode"] == 0, pm.logs(c.agents[pods[0]])[-3000:]

    def carol_elsewhere() -> bool:
        live = sessions(c).get("carol", [])
        return len(live) == 1 and live[0] != pods[0] and reaches(c, carol, backend_ip, 8080)

    wait_for(carol_elsewhere, 150, "carol back through another pod")
    back = time.monotonic() - t0
    print(f"pod stop (drain) took {stop_seconds:.1f} s; carol back after {back:.1f} s")
    # With no Service here, carol's remotes name the pods: told to reconnect (after the 3 s
    # drain delay), her stock client tries the same remote first, the draining pod, which
    # tells her again until its drain ends; after the profile's 10 s server-poll-timeout she
    # moves to the next. On a cluster the terminating pod is out of the Service's new
    # connections by then and she lands elsewhere at once (the lab's drain test).
    assert back < 80, back
    wait_sessions(
        c,
        {"carol": [pods[1]], "dave": [pods[1]], "erin": [pods[2]]},
        "carol moved to pod 1, dave and erin not",
    )
    listed = c.pods()
    assert not listed.get(pods[0], {}).get("ready"), listed.get(pods[0])
    assert reaches(c, dave, backend_ip, 8080)
    assert reaches(c, backend, erin_ip, 8090)
