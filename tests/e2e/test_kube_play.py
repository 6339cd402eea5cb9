"""The fleet as the manifests describe it: rendered by Kustomize, run by ``podman kube play``.

There is no Kubernetes cluster here. podman 4.3 plays Deployments, PersistentVolumeClaims and
ConfigMaps as pods, so the control plane and three agent pods run from the rendered output of
``deploy/kustomize/overlays/sysctl-init-container`` (the base plus a privileged init container
that sets the agent's sysctls: podman 4.3 ignores a pod's ``securityContext.sysctls``, the
base's way, so its agents would stop at start naming them). The manifests are used as rendered
except for the few patches in ``tests/e2e/kubeplay.py``, each one something podman cannot do, with
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
import secrets
import shutil
import time
from collections.abc import Iterator

import pytest

from tests.e2e.kubeplay import (
    CP_SERVICE,
    KUSTOMIZE,
    SERVE,
    Cluster,
    address,
    all_ready,
    container_of,
    diagnose,
    for_podman,
    kinds,
    play_agents,
    profile_for,
    reaches,
    render,
    sessions,
    start_client,
    tunnel_up,
    wait_answers,
    wait_sessions,
)
from tests.e2e.podman import BuiltImage, Podman, podman, vpnfleet_image, wait_for

__all__ = ["vpnfleet_image"]  # the session fixture, used here

pytestmark = [
    pytest.mark.e2e(tools=("podman", "debootstrap", "kubectl", "catatonit")),
    pytest.mark.timeout(1500),
]

OVERLAY = KUSTOMIZE / "overlays" / "sysctl-init-container"
AGENTS = 3


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
        docs = for_podman(
            render(OVERLAY), image=vpnfleet_image.tag, prefix=pm.prefix, secret=secret
        )
        # The base's control plane: one replica on SQLite, on its claim.
        assert kinds(docs["controlplane"]) == ["Deployment", "PersistentVolumeClaim"]
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
        wait_answers(c, c.cp)
        # What deploy/README.md tells the operator to do next: the enrollment token into the
        # Secret, the control plane's CA into the agents' ConfigMap.
        token = json.loads(c.cli("token", "create", "enroll", "--role", "agent", "--json"))
        pm.secret(secret, {**values, "agent-token": token["token"]})
        play_agents(c, AGENTS, pm.exec(c.cp, "cat", "/data/tls/ca.pem"))
        yield c
    finally:
        left = pm.cleanup()
        assert not left, f"left behind: {left}"


def test_the_manifests_run_and_clients_connect_follow_permissions_and_survive_a_drain(
    cluster: Cluster,
) -> None:
    c, pm = cluster, cluster.pm
    pods = sorted(c.agents)

    start = time.monotonic()
    wait_for(
        lambda: all_ready(c), 180, "all agent pods to be ready in the control plane's pod list"
    )
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
        tunnel_up(c, client)
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
