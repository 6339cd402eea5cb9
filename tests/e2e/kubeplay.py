"""The rendered manifests under ``podman kube play``: what the kube play tests share.

There is no Kubernetes cluster here. podman 4.3 plays Deployments, PersistentVolumeClaims and
ConfigMaps as pods. The manifests are used as rendered except for the patches made here and in
the tests' fixtures, each one something podman cannot do, with the reason beside it (the table
in docs/kubernetes.md lists them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.podman import ROOT, Podman, podman, wait_for

KUSTOMIZE = ROOT / "deploy" / "kustomize"
# The Service name the agents are configured with; on podman it is a network alias of the
# control plane's pods (podman has no Services, its DNS answers for aliases).
CP_SERVICE = "vpnfleet-controlplane.vpnfleet.svc"
PLAYED = {"Deployment", "PersistentVolumeClaim"}  # Namespace, Service, NetworkPolicy: no podman
SERVE = "python3 -m http.server --directory /opt/vpnfleet --bind 0.0.0.0"
FETCH = (
    "import sys, urllib.request as u;"
    "print(u.urlopen(f'http://{sys.argv[1]}:{sys.argv[2]}/', timeout=2).status)"
)


def render(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render_variant(tmp: Path, resource: str, components: list[str]) -> list[dict[str, Any]]:
    """A variant as an operator composes one: ``resource`` (e.g. ``overlays/postgres``) plus
    ``components`` (e.g. ``components/bgp``), paths under deploy/kustomize. Kustomize wants
    them relative to the kustomization, which lives in ``tmp``."""
    here = tmp / "variant"
    here.mkdir()
    rel = Path(os.path.relpath(KUSTOMIZE, here))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(rel / resource)],
        "components": [str(rel / c) for c in components],
    }
    (here / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(here)


def strip_podman_gaps(container: dict[str, Any]) -> None:
    # podman publishes every containerPort on the host, so the second replica's ports collide
    # ("address already in use"); on Kubernetes they only document the pod's ports.
    container.pop("ports", None)
    # podman 4.3 turns a probe's named port into port 0 and runs the probe with curl inside
    # the image; readiness probes it ignores. The tests read readiness from the control plane.
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
            if "secret" in volume:
                # podman 4.3 crashes on a secret volume (a nil pointer in VolumeFromSecret,
                # whatever the secret holds): the same keys come from a ConfigMap of the
                # Secret's name, which the test plays beside it. Readable by all: podman
                # ignores fsGroup, which gives the server's group the Secret's files.
                source = volume.pop("secret")
                volume["configMap"] = {
                    "name": f"{prefix}-{source['secretName']}",
                    "items": source.get("items", []),
                    "defaultMode": 0o444,
                }
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
            # user's route depends on.
            container["env"] = [
                e
                for e in container.get("env", [])
                if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "status.podIP"
            ]
        role = "agent" if name == "vpnfleet-agent" else "controlplane"
        out[role].append(doc)
    assert [d["kind"] for d in out["agent"]] == ["Deployment"], out["agent"]
    return out


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def container_of(pod: str, container: str) -> str:
    return f"{pod}-{container}"  # podman kube play's naming


def config_map(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


@dataclass
class Cluster:
    pm: Podman
    image: str
    pods_net: str  # the pod network (control plane, agents) and the company's backend
    internet: str  # where clients are: only the agents' second interface is on it
    admin: str
    cp: str  # the control plane's container the operator's CLI runs in
    docs: dict[str, list[dict[str, Any]]]
    secret: str
    tmp: Path
    cli_ca: str = "/data/tls/ca.pem"  # the control plane's CA, inside ``cp``
    agents: dict[str, str] = field(default_factory=dict)  # pod name -> agent container

    def cli(self, *argv: str) -> str:
        """`vpnfleet ...` as an operator, from inside the control plane's container (the
        CLI reaches it over loopback: the certificate names localhost too)."""
        env = {
            "VPNFLEET_URL": "https://localhost:8443",
            "VPNFLEET_CA_FILE": self.cli_ca,
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

    def play_replicas(
        self,
        deployment: dict[str, Any],
        count: int,
        networks: list[str],
        extra: list[dict[str, Any]],
    ) -> list[str]:
        """The Deployment's ``count`` replicas, one play each (podman 4.3 plays one replica
        per Deployment), with ``extra`` documents (ConfigMaps) in every play. Returns the
        pods' names."""
        pods = []
        for i in range(count):
            replica = json.loads(json.dumps(deployment))
            replica["metadata"]["name"] = f"{deployment['metadata']['name']}-{i}"
            replica["spec"]["replicas"] = 1
            # podman 4.3 makes an emptyDir a named volume called after the volume, shared by
            # every pod that names it: replicas would share one state directory (and, for
            # agents, one pod credential). Each replica gets its own name, as each Kubernetes
            # pod gets its own emptyDir.
            spec = replica["spec"]["template"]["spec"]
            for volume in spec["volumes"]:
                if "emptyDir" in volume:
                    own = f"{replica['metadata']['name']}-{volume['name']}"  # prefixed
                    for ctr in [*spec.get("initContainers", []), *spec["containers"]]:
                        for mount in ctr.get("volumeMounts", []):
                            if mount["name"] == volume["name"]:
                                mount["name"] = own
                    volume["name"] = own
                    self.pm.volumes.append(own)
            for doc in extra:  # a ConfigMap becomes a named volume of its name
                if doc["metadata"]["name"] not in self.pm.volumes:
                    self.pm.volumes.append(doc["metadata"]["name"])
            self.play(replica["metadata"]["name"], [*extra, replica], networks)
            pods.append(f"{replica['metadata']['name']}-pod-0")
        return pods


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


def tunnel_up(c: Cluster, client: str, seconds: float = 90) -> None:
    wait_for(
        lambda: "Initialization Sequence Completed" in c.pm.logs(client),
        seconds,
        f"{client}'s tunnel",
    )


def reaches(c: Cluster, client: str, host: str, port: int) -> bool:
    res = podman("exec", client, "python3", "-c", FETCH, host, str(port), check=False)
    return res.returncode == 0 and res.stdout.strip() == "200"


def sessions(c: Cluster) -> dict[str, list[str]]:
    """user -> pods of the user's live sessions, from the control plane."""
    out: dict[str, list[str]] = {}
    for s in json.loads(c.cli("session", "list", "--active", "--json")):
        out.setdefault(s["user"], []).append(s["pod"])
    return out


def wait_sessions(c: Cluster, expected: dict[str, list[str]], what: str) -> None:
    """Poll the control plane's live sessions until they are ``expected`` (20 s at most)."""
    seen: list[dict[str, list[str]]] = []

    def check() -> bool:
        seen.append(sessions(c))
        return seen[-1] == expected

    wait_for(check, 20, f"live sessions: {what}", detail=lambda: f"last seen {seen[-1]}")


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


def all_ready(c: Cluster) -> bool:
    """Every agent pod runs and the control plane lists it as ready."""
    for pod, container in c.agents.items():
        if not c.pm.state(container)["Running"]:
            pytest.fail(f"agent {pod} exited:\n{c.pm.logs(container)}", pytrace=False)
    listed = c.pods()
    return all(listed.get(p, {}).get("ready") for p in c.agents)


def wait_answers(c: Cluster, container: str, seconds: float = 90) -> None:
    """Wait until the operator's CLI in the control plane's ``container`` gets answers."""

    def answers() -> bool:
        if not c.pm.state(container)["Running"]:
            pytest.fail(f"the control plane exited:\n{c.pm.logs(container)}", pytrace=False)
        try:
            json.loads(
                c.pm.exec(
                    container,
                    "vpnfleet",
                    "pod",
                    "list",
                    "--json",
                    env={
                        "VPNFLEET_URL": "https://localhost:8443",
                        "VPNFLEET_CA_FILE": c.cli_ca,
                        "VPNFLEET_TOKEN": c.admin,
                    },
                )
            )
        except AssertionError:
            return False
        return True

    wait_for(answers, seconds, f"the control plane in {container} to answer")


def play_agents(c: Cluster, count: int, ca: str) -> None:
    """The agent Deployment's ``count`` replicas, with the control plane's CA in their
    ConfigMap (what deploy/README.md has the operator make), into ``c.agents``."""
    [agent] = c.docs["agent"]
    configmap = config_map(f"{c.pm.prefix}-vpnfleet-controlplane-ca", {"ca.crt": ca})
    # eth0 on the pod network (the manifest's VPNFLEET_UPLINK), eth1 where clients are;
    # named, since podman does not keep the order of a pod's networks.
    networks = [f"{c.pods_net}:interface_name=eth0", f"{c.internet}:interface_name=eth1"]
    for pod in c.play_replicas(agent, count, networks, [configmap]):
        c.agents[pod] = container_of(pod, "agent")
