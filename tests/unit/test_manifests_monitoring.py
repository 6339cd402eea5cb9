"""The monitoring Component: what the Prometheus Operator scrapes and alerts on.

PodMonitor, ServiceMonitor and PrometheusRule are the operator's kinds (CRDs): the Kubernetes
schemas of test_deploy.py do not know them. These tests check them against what they point at:

- every field is one these tests know (a misspelt one is an error, as for the core kinds);
- the PodMonitor selects the agent pods on a port they declare, the ServiceMonitor the control
  plane's Service (and only it) on a port the Service has, over HTTPS with the CA ConfigMap the
  agents trust and a name the certificate is made for; both give the job label the alert rules
  select, and their relabelings pass `promtool check config`;
- the PrometheusRule's groups are deploy/prometheus/alerts.yml's (the file is made from it by
  deploy/prometheus/prometheusrule.py), and the groups taken out of the rendered object pass
  `promtool check rules` and alerts_test.yml's rule tests.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy import (
    KUSTOMIZE,
    OPERATOR_KINDS,
    ROOT,
    find,
    render,
    schema_errors,
    selects,
)

PROM_DIR = ROOT / "deploy" / "prometheus"
COMPONENT = KUSTOMIZE / "components" / "monitoring"

# The fields vpnfleet uses, as a tree: a dict is an object whose keys must be among its keys,
# None a value of any shape. A list value is checked item by item.
_RELABEL = dict.fromkeys(["action", "sourceLabels", "targetLabel", "replacement", "regex"])
_META = {"name": None, "namespace": None, "labels": None}
SHAPES: dict[str, dict[str, Any]] = {
    "PodMonitor": {
        "namespaceSelector": {"matchNames": None},
        "selector": {"matchLabels": None},
        "podMetricsEndpoints": {
            "port": None,
            "path": None,
            "interval": None,
            "relabelings": _RELABEL,
        },
    },
    "ServiceMonitor": {
        "namespaceSelector": {"matchNames": None},
        "selector": {"matchLabels": None},
        "endpoints": {
            "port": None,
            "scheme": None,
            "path": None,
            "interval": None,
            "tlsConfig": {"serverName": None, "ca": {"configMap": {"name": None, "key": None}}},
            "relabelings": _RELABEL,
        },
    },
    "PrometheusRule": {
        "groups": {
            "name": None,
            "interval": None,
            "rules": dict.fromkeys(["alert", "record", "expr", "for", "labels", "annotations"]),
        }
    },
}


def unknown_fields(value: Any, shape: dict[str, Any] | None, where: str = "") -> list[str]:
    """Paths in `value` that `shape` does not have."""
    if shape is None:
        return []
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in unknown_fields(v, shape, f"{where}.{i}")]
    if not isinstance(value, dict):
        return [f"{where}: an object was expected, not {value!r}"]
    return [
        e
        for k, v in value.items()
        for e in (unknown_fields(v, shape[k], f"{where}.{k}") if k in shape else [f"{where}.{k}"])
    ]


def operator_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if (d["apiVersion"], d["kind"]) in OPERATOR_KINDS]


def shape_errors(d: dict[str, Any]) -> list[str]:
    top = {"apiVersion": None, "kind": None, "metadata": _META, "spec": SHAPES[d["kind"]]}
    return unknown_fields(d, top, d["kind"])


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render("deploy/kustomize/overlays/monitoring")


def test_the_operator_objects_use_only_known_fields(docs: list[dict[str, Any]]) -> None:
    found = operator_objects(docs)
    assert sorted(d["kind"] for d in found) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    for d in found:
        assert shape_errors(d) == [], d["kind"]
    # The check can fail: a misspelt field anywhere is named.
    sm = copy.deepcopy(find(docs, "ServiceMonitor", "vpnfleet-controlplane"))
    sm["spec"]["endpoints"][0]["tlsConfig"]["servername"] = "x"
    sm["spec"]["endpoints"][0]["relabelings"][0]["target_label"] = "x"
    assert sorted(shape_errors(sm)) == [
        "ServiceMonitor.spec.endpoints.0.relabelings.0.target_label",
        "ServiceMonitor.spec.endpoints.0.tlsConfig.servername",
    ]


def _job(relabelings: list[dict[str, Any]]) -> str | None:
    """The job label a list of relabelings sets unconditionally, if any."""
    jobs = [
        r["replacement"]
        for r in relabelings
        if r.get("targetLabel") == "job"
        and r.get("action", "replace") == "replace"
        and not r.get("sourceLabels")
    ]
    return jobs[-1] if jobs else None


def _rule_jobs() -> set[str]:
    text = (PROM_DIR / "alerts.yml").read_text()
    return set(re.findall(r'job="([^"]+)"', text))


def test_the_pod_monitor_scrapes_every_agent_as_the_rules_expect(
    docs: list[dict[str, Any]],
) -> None:
    pm = find(docs, "PodMonitor", "vpnfleet-agent")["spec"]
    agent = find(docs, "Deployment", "vpnfleet-agent")
    pod = agent["spec"]["template"]
    assert selects(pm["selector"], pod["metadata"]["labels"])
    assert pm["namespaceSelector"]["matchNames"] == [agent["metadata"]["namespace"]]
    # No other pod is scraped as an agent.
    others = [d for d in docs if d["kind"] == "Deployment" and d is not agent]
    assert not [
        d for d in others if selects(pm["selector"], d["spec"]["template"]["metadata"]["labels"])
    ]
    [endpoint] = pm["podMetricsEndpoints"]
    [container] = pod["spec"]["containers"]
    [port] = [p for p in container["ports"] if p["name"] == endpoint["port"]]
    # The probes' port: the one that serves /metrics without user names (docs/observability.md).
    assert port["containerPort"] == 9176 and port.get("protocol", "TCP") == "TCP"
    assert container["readinessProbe"]["httpGet"]["port"] == endpoint["port"]
    assert endpoint["path"] == "/metrics"
    assert _job(endpoint["relabelings"]) == "vpnfleet-agent"
    assert "vpnfleet-agent" in _rule_jobs()


def test_the_service_monitor_scrapes_each_control_plane_replica_over_https(
    docs: list[dict[str, Any]],
) -> None:
    sm = find(docs, "ServiceMonitor", "vpnfleet-controlplane")["spec"]
    services = [d for d in docs if d["kind"] == "Service"]
    chosen = [s for s in services if selects(sm["selector"], s["metadata"].get("labels", {}))]
    assert [s["metadata"]["name"] for s in chosen] == ["vpnfleet-controlplane"]
    [svc] = chosen
    assert sm["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    [endpoint] = sm["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert (endpoint["scheme"], endpoint["path"]) == ("https", "/metrics")
    # Trusts what the agents trust, for the name the agents use (it is in the certificate).
    agent = find(docs, "Deployment", "vpnfleet-agent")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in agent["containers"][0]["env"]}
    host = re.fullmatch(r"https://([^:/]+):\d+", env["VPNFLEET_SERVER"])
    assert host is not None
    tls = endpoint["tlsConfig"]
    assert tls["serverName"] == host[1]
    ca_volume = next(v for v in agent["volumes"] if v["name"] == "controlplane-ca")["configMap"]
    assert tls["ca"]["configMap"] == {"name": ca_volume["name"], "key": "ca.crt"}
    cp = find(docs, "Deployment", "vpnfleet-controlplane")["spec"]["template"]["spec"]
    cp_env = {e["name"]: e.get("value") for e in cp["containers"][0]["env"]}
    assert host[1] in cp_env["VPNFLEET_TLS_SELF_SIGNED"].split(",")
    # The operator names the job after the Service; nothing here changes it.
    assert _job(endpoint["relabelings"]) is None
    assert svc["metadata"]["name"] in _rule_jobs()
    # The replica's name goes in `replica`, and the operator's `pod` target label is dropped:
    # the control plane's series have a pod label of their own (the agent pod they are about).
    relabel = endpoint["relabelings"]
    assert {"action": "labeldrop", "regex": "pod"} in relabel
    assert {
        "action": "replace",
        "sourceLabels": ["__meta_kubernetes_pod_name"],
        "targetLabel": "replica",
    } in relabel


def _snake(key: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), key)


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is needed (apt-get install prometheus; scripts/bootstrap.sh does it)")
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_relabelings_are_valid_prometheus_relabel_configs(
    docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    # The operator copies relabelings into the scrape config as they are (camelCase to
    # snake_case). The Debian promtool has no Kubernetes discovery: static targets instead.
    def scrape_config(name: str, relabelings: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "job_name": name,
            "static_configs": [{"targets": ["127.0.0.1:9"]}],
            "relabel_configs": [{_snake(k): v for k, v in r.items()} for r in relabelings],
        }

    pm = find(docs, "PodMonitor", "vpnfleet-agent")["spec"]["podMetricsEndpoints"][0]
    sm = find(docs, "ServiceMonitor", "vpnfleet-controlplane")["spec"]["endpoints"][0]
    config = {
        "scrape_configs": [
            scrape_config("agent", pm["relabelings"]),
            scrape_config("controlplane", sm["relabelings"]),
        ]
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    # ...and the check can fail: an action Prometheus does not have.
    config["scrape_configs"][1]["relabel_configs"][1]["action"] = "label_drop"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert out.returncode != 0 and "label_drop" in out.stdout + out.stderr


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prometheusrule", PROM_DIR / "prometheusrule.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_prometheus_rule_is_made_from_alerts_yml(docs: list[dict[str, Any]]) -> None:
    alerts = (PROM_DIR / "alerts.yml").read_text()
    gen = _generator()
    # The committed file is the script's output for the alerts.yml of this commit...
    assert (COMPONENT / "prometheusrule.yaml").read_text() == gen.render(alerts), (
        "run python3 deploy/prometheus/prometheusrule.py after editing alerts.yml"
    )
    # ...which carries exactly alerts.yml's groups through kustomize.
    rule = find(docs, "PrometheusRule", "vpnfleet-alerts")
    assert rule["spec"]["groups"] == yaml.safe_load(alerts)["groups"]
    # A changed rule changes the output (the comparison above can fail).
    changed = alerts.replace("for: 2m", "for: 3m", 1)
    assert changed != alerts and gen.render(changed) != gen.render(alerts)
    with pytest.raises(ValueError, match="groups"):
        gen.render("rules: []\n")


def _extracted_rules(docs: list[dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    groups = {"groups": find(docs, "PrometheusRule", "vpnfleet-alerts")["spec"]["groups"]}
    shutil.copy(PROM_DIR / "alerts_test.yml", tmp_path / "alerts_test.yml")
    return groups


def test_the_prometheus_rule_passes_promtool(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """The rules as the operator will load them: checked and unit-tested by promtool."""
    groups = _extracted_rules(docs, tmp_path)
    # alerts_test.yml reads alerts.yml next to it: here, the rules taken out of the object.
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(groups, sort_keys=False))
    count = sum(len(g["rules"]) for g in groups["groups"])
    out = promtool("check", "rules", "alerts.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {count} rules found" in out.stdout
    out = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_refuses_a_broken_rule_taken_from_the_object(
    docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    groups = _extracted_rules(docs, tmp_path)
    groups["groups"][0]["rules"][0]["expr"] = "vpnfleet_agent_ready == 0 and"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(groups, sort_keys=False))
    out = promtool("check", "rules", "alerts.yml", cwd=tmp_path)
    assert out.returncode != 0
    assert '"VpnfleetPodNotReady": could not parse expression' in out.stdout + out.stderr


def test_the_component_adds_to_the_postgres_overlay(tmp_path: Path) -> None:
    """What the Component's comment tells users to write: monitoring over another variant."""
    overlay = tmp_path / "mine"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes relative paths only
                "resources": [os.path.relpath(KUSTOMIZE / "overlays" / "postgres", overlay)],
                "components": [os.path.relpath(COMPONENT, overlay)],
            }
        )
    )
    docs = render(str(overlay))  # an absolute path: ROOT / path is the path itself
    assert sorted(d["kind"] for d in operator_objects(docs)) == [
        "PodMonitor",
        "PrometheusRule",
        "ServiceMonitor",
    ]
    assert find(docs, "Deployment", "vpnfleet-controlplane")["spec"]["replicas"] == 2
    sm = find(docs, "ServiceMonitor", "vpnfleet-controlplane")["spec"]
    svc = find(docs, "Service", "vpnfleet-controlplane")
    assert selects(sm["selector"], svc["metadata"]["labels"])
    assert all(d["metadata"].get("namespace") == "vpnfleet" for d in operator_objects(docs))
    assert schema_errors(docs) == []
    assert [e for d in operator_objects(docs) for e in shape_errors(d)] == []
