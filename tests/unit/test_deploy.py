"""The Kubernetes manifests render, are valid Kubernetes objects, and say what the agent needs.

Every variant (the base and each directory under deploy/kustomize/overlays, found by listing
it) is rendered with `kubectl kustomize` and every object checked against the Kubernetes API's
JSON schemas (kubernetes-validate's bundled copies, strict: an unknown field is an error, as
`kubectl apply --validate=strict` would say), offline. The Prometheus Operator's kinds are not
Kubernetes kinds: tests/unit/test_manifests_monitoring.py checks them; any other kind is refused.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from vpnfleet.agent.settings import AgentSettings
from vpnfleet.agent.sysctls import SYSCTLS

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kustomize"
# The oldest Kubernetes the manifests are written for (topologySpreadConstraints'
# matchLabelKeys and nodeTaintsPolicy are on by default from 1.27) and the newest whose schemas
# kubernetes-validate bundles: a field or API version removed since fails the second.
K8S_VERSIONS = ("1.29", "1.37")
# Prometheus Operator kinds (CRDs), checked by test_manifests_monitoring.py.
OPERATOR_KINDS = {
    ("monitoring.coreos.com/v1", k) for k in ("PodMonitor", "ServiceMonitor", "PrometheusRule")
}
VARIANTS = [
    "base",
    *sorted(f"overlays/{d.name}" for d in (KUSTOMIZE / "overlays").iterdir() if d.is_dir()),
]


def render(path: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` makes of `path` (relative to the repository)."""
    return copy.deepcopy(_render(str(ROOT / path)))


@cache
def _render(path: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render deploy/kustomize (kubectl kustomize)")
    out = subprocess.run(
        [kubectl, "kustomize", path], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def schema_errors(docs: Iterable[dict[str, Any]]) -> list[str]:
    """One line per object that is not a valid Kubernetes object for every K8S_VERSIONS
    (strict schemas), or whose kind has no schema and is not an OPERATOR_KINDS one."""
    errors = []
    for d in docs:
        name = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if (d.get("apiVersion"), d.get("kind")) in OPERATOR_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                errors.append(f"{name} (Kubernetes {version}) at {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"{name}: unknown kind ({e.message})")
    return errors


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_valid_kubernetes(variant: str) -> None:
    docs = render(f"deploy/kustomize/{variant}")
    assert schema_errors(docs) == []
    for d in docs:
        meta = d["metadata"]
        # Stated, not defaulted: kubectl apply -k puts an object without one in the current
        # namespace (a Component's or an overlay's own resources miss the base's transformer).
        if d["kind"] != "Namespace":
            assert meta.get("namespace") == "vpnfleet", f"{d['kind']}/{meta['name']}"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "vpnfleet"
    operator_objects = [d for d in docs if (d["apiVersion"], d["kind"]) in OPERATOR_KINDS]
    # Clusters without the Prometheus Operator's CRDs take every variant but those that ask for
    # the monitoring Component (kubectl apply refuses a kind it does not know).
    kustomization = yaml.safe_load((KUSTOMIZE / variant / "kustomization.yaml").read_text())
    if "../../components/monitoring" not in kustomization.get("components", []):
        assert operator_objects == []
    for spec in pod_specs(docs):
        _every_container_has_resources(spec)
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        _budget_lets_a_drain_through(docs, pdb)


def test_schema_check_refuses_what_kubectl_would() -> None:
    """The check above can fail: a misspelt field, a wrong type and an unknown kind are errors."""
    docs = render("deploy/kustomize/base")
    agent = find(docs, "Deployment", "vpnfleet-agent")
    typo = copy.deepcopy(agent)
    typo["spec"]["template"]["spec"]["containers"][0]["resource"] = {"limits": {"cpu": "1"}}
    errors = schema_errors([typo])
    assert len(errors) == len(K8S_VERSIONS)  # one per Kubernetes version
    assert all("containers.0" in e and "'resource' was unexpected" in e for e in errors)
    typo = copy.deepcopy(agent)
    typo["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["maxskew"] = 1
    assert schema_errors([typo])
    wrong_type = copy.deepcopy(agent)
    wrong_type["spec"]["replicas"] = "3"
    assert schema_errors([wrong_type])
    pdb = find(docs, "PodDisruptionBudget", "vpnfleet-agent")
    old_api = dict(copy.deepcopy(pdb), apiVersion="policy/v1beta1")  # removed in 1.25
    assert schema_errors([old_api])
    unknown = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "Probe",  # an operator kind, but not one the monitoring tests check
        "metadata": {"name": "x", "namespace": "vpnfleet"},
        "spec": {},
    }
    errors = schema_errors([unknown])
    assert errors and all("unknown kind" in e for e in errors)


def pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]


_UNITS = {"m": 0.001, "": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(q: str | int) -> float:
    """A Kubernetes quantity of the forms the manifests use (250m, 2, 256Mi, 1Gi)."""
    m = re.fullmatch(r"(\d+)(m|Ki|Mi|Gi|)", str(q))
    assert m, f"unexpected quantity {q!r}"
    return int(m[1]) * _UNITS[m[2]]


def _every_container_has_resources(spec: dict[str, Any]) -> None:
    for c in spec["containers"] + spec.get("initContainers", []):
        res = c["resources"]
        for r in ("cpu", "memory"):
            assert quantity(res["requests"][r]) <= quantity(res["limits"][r]), (c["name"], r)
        assert quantity(res["requests"]["memory"]) >= 16 * 2**20


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a matchLabels-only selector selects an object with `labels`."""
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are used here"
    wanted: dict[str, str] = selector["matchLabels"]
    return wanted.items() <= labels.items()


def _budget_lets_a_drain_through(docs: list[dict[str, Any]], pdb: dict[str, Any]) -> None:
    """A PodDisruptionBudget covers exactly one Deployment and always lets one pod go: one that
    lets none would hold every node drain up forever."""
    spec = pdb["spec"]
    [dep] = [
        d
        for d in docs
        if d["kind"] == "Deployment"
        and selects(spec["selector"], d["spec"]["template"]["metadata"]["labels"])
    ]
    assert spec["selector"] == dep["spec"]["selector"]
    replicas = dep["spec"]["replicas"]
    if "maxUnavailable" in spec:
        assert 1 <= spec["maxUnavailable"] < replicas
    else:
        assert 1 <= spec["minAvailable"] < replicas
    assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def _spread_over_nodes(deployment: dict[str, Any]) -> None:
    """Pods of `deployment` go to different nodes (hard) and zones (soft), counted per revision."""
    pod = deployment["spec"]["template"]
    by_key = {c["topologyKey"]: c for c in pod["spec"]["topologySpreadConstraints"]}
    assert set(by_key) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for c in by_key.values():
        assert selects(c["labelSelector"], pod["metadata"]["labels"])
        assert c["labelSelector"] == deployment["spec"]["selector"]
        assert c["maxSkew"] == 1 and c["matchLabelKeys"] == ["pod-template-hash"]
    host = by_key["kubernetes.io/hostname"]
    assert host["whenUnsatisfiable"] == "DoNotSchedule" and host["nodeTaintsPolicy"] == "Honor"
    assert by_key["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"


def test_agents_are_spread_and_drained_one_at_a_time() -> None:
    docs = render("deploy/kustomize/base")
    agent = find(docs, "Deployment", "vpnfleet-agent")
    _spread_over_nodes(agent)
    pdb = find(docs, "PodDisruptionBudget", "vpnfleet-agent")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert selects(pdb["selector"], agent["spec"]["template"]["metadata"]["labels"])
    assert agent["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    # One control-plane replica: no budget at all (it could only block drains).
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"] == [
        "vpnfleet-agent"
    ]


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
    _spread_over_nodes(find(docs, "Deployment", "vpnfleet-controlplane"))
    budget = find(docs, "PodDisruptionBudget", "vpnfleet-controlplane")["spec"]
    assert budget["minAvailable"] == 1
    assert selects(budget["selector"], cp["template"]["metadata"]["labels"])
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


def test_bgp_overlay_turns_bgp_on_with_one_more_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render("deploy/kustomize/overlays/bgp")
    agent = find(docs, "Deployment", "vpnfleet-agent")["spec"]["template"]["spec"]
    [c] = agent["containers"]
    sc = c["securityContext"]
    # BIRD binds TCP 179: NET_BIND_SERVICE, and still nothing else.
    assert sc["capabilities"] == {
        "drop": ["ALL"],
        "add": ["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"],
    }
    assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged", False)
    assert {"name": "bgp", "containerPort": 179, "protocol": "TCP"} in c["ports"]
    # The agent accepts what the manifest gives it (the pod IP is the router id, as on a
    # cluster through the Downward API).
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VPNFLEET_AGENT_TOKEN", "vpf_" + "a" * 48)
    monkeypatch.setenv("VPNFLEET_POD_NAME", "vpnfleet-agent-0")
    monkeypatch.setenv("VPNFLEET_POD_IP", "10.0.5.7")
    monkeypatch.delenv("VPNFLEET_CA_FILE")  # a ConfigMap's file on a cluster, not here
    if shutil.which("bird") is None:
        pytest.fail("bird (Debian's bird2) is needed: scripts/bootstrap.sh installs it")
    settings = AgentSettings.from_env()
    assert settings.bgp_config is not None
    # The base, without the Component, leaves BGP off.
    base = find(render("deploy/kustomize/base"), "Deployment", "vpnfleet-agent")
    names = {e["name"] for e in base["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not any(n.startswith("VPNFLEET_BGP") for n in names)


def test_the_components_compose_over_the_postgres_overlay(tmp_path: Path) -> None:
    """What tests/e2e/test_kube_play_ha.py plays: the postgres overlay with the init-container
    and BGP Components, written the way each Component's header tells an operator to, over an
    overlay of the operator's own that moves the image to their registry and tag."""
    mine, variant = tmp_path / "mine", tmp_path / "variant"
    for d in (mine, variant):
        d.mkdir()
    rel = Path(os.path.relpath(KUSTOMIZE, mine))
    image = {"name": "vpnfleet", "newName": "registry.example.com/vpnfleet", "newTag": "0.2.0"}
    (mine / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(rel / "overlays" / "postgres")],
                "images": [image],
            }
        )
    )
    components = ["sysctl-init-container", "bgp"]
    (variant / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../mine"],
                "components": [str(rel / "components" / c) for c in components],
            }
        )
    )
    docs = _render(str(variant))
    assert schema_errors(docs) == []
    assert find(docs, "Deployment", "vpnfleet-controlplane")["spec"]["replicas"] == 2
    agent = find(docs, "Deployment", "vpnfleet-agent")["spec"]["template"]["spec"]
    assert "sysctls" not in agent["securityContext"]
    [init] = agent["initContainers"]
    [c] = agent["containers"]
    # The init container runs the agent's image, as the variant under the Component made it.
    assert init["image"] == c["image"] == "registry.example.com/vpnfleet:0.2.0"
    assert {"name": "VPNFLEET_BGP", "value": "true"} in c["env"]
    assert "NET_BIND_SERVICE" in c["securityContext"]["capabilities"]["add"]
