"""The Kubernetes manifests render and say what the agent needs to work."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

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
    assert "NET_ADMIN" in c["securityContext"]["capabilities"]["add"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["terminationGracePeriodSeconds"] >= 20
    env = {e["name"]: e for e in c["env"]}
    assert env["VPNFLEET_SERVER"]["value"] == "http://vpnfleet-controlplane:8000"
    assert env["VPNFLEET_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert any(v["hostPath"]["path"] == "/dev/net/tun" for v in agent["volumes"] if "hostPath" in v)
    svc = find(docs, "Service", "vpnfleet-openvpn")["spec"]
    assert svc["ports"][0]["protocol"] == "UDP" and svc["ports"][0]["port"] == 1194
    cp = find(docs, "Deployment", "vpnfleet-controlplane")["spec"]
    assert cp["replicas"] == 1  # SQLite on a volume: one writer
    assert all(d["metadata"].get("namespace", "vpnfleet") == "vpnfleet" for d in docs)


def test_postgres_overlay_scales_the_control_plane() -> None:
    docs = render("deploy/kustomize/overlays/postgres")
    cp = find(docs, "Deployment", "vpnfleet-controlplane")["spec"]
    assert cp["replicas"] >= 2
    env = {e["name"] for e in cp["template"]["spec"]["containers"][0]["env"]}
    assert "VPNFLEET_DATABASE_URL" in env
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
