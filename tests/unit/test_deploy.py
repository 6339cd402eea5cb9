"""The Kubernetes manifests render and say what the agent needs to work."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from vpnfleet.agent.sysctls import SYSCTLS

ROOT = Path(__file__).resolve().parents[2]


def render(path: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render deploy/kustomize (kubectl kustomize)")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / path)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind}/{name}")


def test_base_manifests() -> None:
    docs = render("deploy/kustomize/base")
    agent = find(docs, "Deployment", "vpnfleet-agent")["spec"]["template"]["spec"]
    c = agent["containers"][0]
    _agent_has_network_capabilities_only(c)
    # Set by the kubelet, the Kubernetes way: exactly the settings the agent checks at start.
    assert {s["name"]: s["value"] for s in agent["securityContext"]["sysctls"]} == dict(SYSCTLS)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["terminationGracePeriodSeconds"] >= 20
    env = {e["name"]: e for e in c["env"]}
    # The agent speaks https to the control plane's Service name and trusts only its CA,
    # mounted from the ConfigMap the operator makes from the control plane's ca.pem.
    server = env["VPNFLEET_SERVER"]["value"]
    assert server == "https://vpnfleet-controlplane.vpnfleet.svc:8443"
    ca_file = Path(env["VPNFLEET_CA_FILE"]["value"])
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(ca_file.parent))
    ca_volume = next(v for v in agent["volumes"] if v["name"] == mount["name"])
    assert ca_volume["configMap"]["name"] == "vpnfleet-controlplane-ca"
    assert ca_volume["configMap"]["items"] == [{"key": ca_file.name, "path": ca_file.name}]
    assert env["VPNFLEET_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert any(v["hostPath"]["path"] == "/dev/net/tun" for v in agent["volumes"] if "hostPath" in v)
    svc = find(docs, "Service", "vpnfleet-openvpn")["spec"]
    assert svc["ports"][0]["protocol"] == "UDP" and svc["ports"][0]["port"] == 1194
    # The TCP fallback: its own Service on 443, to the port the agent's TCP server listens on.
    tcp = find(docs, "Service", "vpnfleet-openvpn-tcp")["spec"]
    assert tcp["selector"] == svc["selector"] and tcp["externalTrafficPolicy"] == "Local"
    (tcp_port,) = tcp["ports"]
    assert (tcp_port["protocol"], tcp_port["port"]) == ("TCP", 443)
    (container_port,) = [p for p in c["ports"] if p["name"] == tcp_port["targetPort"]]
    assert container_port["protocol"] == "TCP"
    assert env["VPNFLEET_TCP_PORT"]["value"] == str(container_port["containerPort"])
    cp = find(docs, "Deployment", "vpnfleet-controlplane")["spec"]
    assert cp["replicas"] == 1  # SQLite on a volume: one writer
    cpc = cp["template"]["spec"]["containers"][0]
    cp_env = {e["name"]: e.get("value") for e in cpc["env"]}
    # A certificate made at first start on the volume, for the name the agents use.
    assert "vpnfleet-controlplane.vpnfleet.svc" in cp_env["VPNFLEET_TLS_SELF_SIGNED"].split(",")
    assert cp_env["VPNFLEET_DATA_DIR"] == "/data"
    _serves_https_on_the_service_port(docs, cpc, server)
    cp_pod = cp["template"]["spec"]["securityContext"]
    assert cp_pod["runAsNonRoot"] is True and cp_pod["runAsUser"] != 0
    assert cpc["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert all(d["metadata"].get("namespace", "vpnfleet") == "vpnfleet" for d in docs)


def _agent_has_network_capabilities_only(container: dict[str, Any]) -> None:
    sc = container["securityContext"]
    # NET_RAW: iptables' set match looks ipsets up through a raw socket (docs/kubernetes.md).
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["runAsUser"] == 0  # added capabilities reach uid 0 only (deploy/README.md)


def test_init_container_overlay_sets_the_sysctls_instead_of_the_kubelet() -> None:
    docs = render("deploy/kustomize/overlays/sysctl-init-container")
    agent = find(docs, "Deployment", "vpnfleet-agent")["spec"]["template"]["spec"]
    assert "sysctls" not in agent["securityContext"]
    [init] = agent["initContainers"]
    assert init["command"][:2] == ["sysctl", "-w"]
    assert init["command"][2:] == [f"{k}={v}" for k, v in SYSCTLS]
    assert init["securityContext"]["privileged"] is True
    [c] = agent["containers"]
    assert init["image"] == c["image"] == "vpnfleet:0.1.0"
    _agent_has_network_capabilities_only(c)


def _serves_https_on_the_service_port(
    docs: list[dict[str, Any]], container: dict[str, Any], agent_url: str
) -> None:
    """The listen port, Service, probes and NetworkPolicy agree, and only agents and the
    operators' namespaces may reach the port."""
    port = int(agent_url.rsplit(":", 1)[1])
    assert container["args"][container["args"].index("--listen") + 1] == f"0.0.0.0:{port}"
    assert container["ports"] == [{"name": "https", "containerPort": port}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    svc = find(docs, "Service", "vpnfleet-controlplane")["spec"]
    assert svc["ports"] == [{"name": "https", "port": port, "targetPort": "https"}]
    policy = find(docs, "NetworkPolicy", "vpnfleet-controlplane")["spec"]
    assert policy["podSelector"]["matchLabels"] == svc["selector"]
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "vpnfleet-agent"}}},
        {"namespaceSelector": {"matchLabels": {"vpnfleet.io/operators": "true"}}},
    ]


def test_postgres_overlay_scales_the_control_plane() -> None:
    docs = render("deploy/kustomize/overlays/postgres")
    cp = find(docs, "Deployment", "vpnfleet-controlplane")["spec"]
    assert cp["replicas"] >= 2
    container = cp["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "VPNFLEET_DATABASE_URL" in env
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    # Replicas share one certificate from a Secret; none makes its own.
    assert "VPNFLEET_TLS_SELF_SIGNED" not in env
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert env["VPNFLEET_TLS_CERT"] == f"{mount['mountPath']}/tls.crt"
    assert env["VPNFLEET_TLS_KEY"] == f"{mount['mountPath']}/tls.key"
    tls = next(v for v in cp["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "vpnfleet-controlplane-tls"
    agent = find(docs, "Deployment", "vpnfleet-agent")["spec"]["template"]["spec"]
    agent_env = {e["name"]: e.get("value") for e in agent["containers"][0]["env"]}
    _serves_https_on_the_service_port(docs, container, agent_env["VPNFLEET_SERVER"])
