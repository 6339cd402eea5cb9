"""The alert rules and the dashboard as Prometheus itself reads them.

- `promtool check rules` and `promtool test rules` (deploy/prometheus/alerts_test.yml proves each
  alert fires on its condition and stays quiet without it); a deliberately broken rule must make
  the rule tests fail, so they are known to be able to fail.
- Every query of deploy/grafana/vpnfleet.json is sent to a real Prometheus (loopback, empty
  TSDB in a temporary directory): promtool has no query parser, the query API has one.
- Every openvpn_*/vpnfleet_* name the rules and the dashboard use is one vpnfleet exports: a
  misspelt name parses fine and silently never matches.

promtool and prometheus come from the Debian `prometheus` package (scripts/bootstrap.sh); the
tests fail, not skip, without them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "vpnfleet.json"
NAME_RE = re.compile(r"\b((?:openvpn|vpnfleet)_[a-zA-Z0-9_]+)")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is needed (apt-get install prometheus; scripts/bootstrap.sh does it)")
    return path


def promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard, Grafana's variables filled in."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        inner = re.fullmatch(r"label_values\((.+), *\w+\)", var["definition"])
        assert inner, var["definition"]
        exprs.append(inner.group(1))
    return [
        e.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$__range", "1h")
        for e in exprs
    ]


# ------------------------------------------------------------------ rules


def test_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_rule_unit_tests_pass() -> None:
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    doc = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in rules()}
    assert names - fired == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_rule_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    text = (PROM_DIR / "alerts.yml").read_text()
    # Forget that a draining pod is expected to be unready.
    broken = text.replace(
        "expr: vpnfleet_agent_ready == 0 and vpnfleet_agent_draining == 0",
        "expr: vpnfleet_agent_ready == 0",
    )
    assert broken != text
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(PROM_DIR / "alerts_test.yml", tmp_path / "alerts_test.yml")
    out = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert out.returncode != 0
    assert "VpnfleetPodNotReady" in out.stdout + out.stderr


def test_example_config_uses_the_job_names_the_rules_expect() -> None:
    # The Debian promtool is built without Kubernetes discovery, so `promtool check config`
    # cannot read this file here; check what the rules and dashboard rely on instead.
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    jobs = {c["job_name"] for c in cfg["scrape_configs"]}
    assert jobs == {"vpnfleet-agent", "vpnfleet-controlplane"}
    used = " ".join([*(r["expr"] for r in rules()), *dashboard_queries()])
    assert set(re.findall(r'job="([^"]+)"', used)) == jobs
    # The control plane serves HTTPS only (deploy/kustomize): scraped with its CA, checked for
    # the Service's name (targets are pod IPs), on the port the Service names https.
    [cp] = [c for c in cfg["scrape_configs"] if c["job_name"] == "vpnfleet-controlplane"]
    assert cp["scheme"] == "https"
    assert cp["tls_config"]["server_name"] == "vpnfleet-controlplane.vpnfleet.svc"
    port_rule = next(
        r
        for r in cp["relabel_configs"]
        if r["source_labels"] == ["__meta_kubernetes_endpoint_port_name"]
    )
    assert port_rule["regex"] == "https"


# ------------------------------------------------------------------ names exist


def exported_names() -> set[str]:
    """Every sample name the agent and the control plane can serve."""
    import datetime as dt
    import tempfile

    from prometheus_client import CollectorRegistry

    from vpnfleet.agent.exporter import AgentCollector
    from vpnfleet.agent.metrics import AgentMetrics
    from vpnfleet.agent.pod import PodAgent
    from vpnfleet.agent.settings import AgentSettings
    from vpnfleet.controlplane.metrics import ControlPlaneMetrics, DbFacts, PKIFacts, PodFacts

    def expand(registry: CollectorRegistry, extra: list[Any]) -> set[str]:
        out: set[str] = set()
        for fam in [*registry.collect(), *extra]:
            if fam.type == "counter":
                out.add(fam.name + "_total")
            elif fam.type == "histogram":
                out.update(fam.name + s for s in ("_bucket", "_sum", "_count"))
            else:
                out.add(fam.name)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        settings = AgentSettings(
            server="http://127.0.0.1:9", token="t", name="p", state_dir=Path(tmp)
        )
        agent = AgentMetrics("p", PodAgent(settings))
        assert isinstance(agent.collector, AgentCollector)
        names = expand(agent.registry, agent.collector.describe())
    cp = ControlPlaneMetrics()
    now = dt.datetime.now(dt.UTC).timestamp()
    cp.fleet.facts = DbFacts(
        up=True,
        probe_seconds=0.001,
        pods=(PodFacts("pod1", True, now, 1, 0, 0, False),),
        sessions_by_pod={"pod1": 0},
        pki=PKIFacts(now, {"client": now}, {"client": 0}),
    )
    cp.latency.labels(route="/x", method="GET", status="2xx").observe(0.01)
    return names | expand(cp.registry, [])


def test_every_metric_name_used_is_exported() -> None:
    names = exported_names()
    used = {
        n for e in [*(r["expr"] for r in rules()), *dashboard_queries()] for n in NAME_RE.findall(e)
    }
    assert used, "no metric names found"
    assert used - names == set()
    # And the openvpn_exporter names are there.
    assert {"openvpn_connections", "openvpn_bytes_received", "openvpn_bytes_sent"} <= names
    assert {"openvpn_connected_since", "openvpn_server_info", "openvpn_last_updated"} <= names


# ------------------------------------------------------------------ dashboard queries parse


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus on loopback with an empty TSDB; its base URL."""
    binary = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prom")
    (tmp / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready in 30 s"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_every_dashboard_query_parses(prometheus: str) -> None:
    queries = dashboard_queries()
    assert len(queries) > 30
    bad = []
    with httpx.Client(base_url=prometheus, timeout=10) as http:
        # The check itself must be able to fail: a broken query is refused.
        refused = http.get("/api/v1/query", params={"query": "sum(rate(openvpn_up[5m]"})
        assert refused.status_code == 400 and refused.json()["errorType"] == "bad_data"
        for q in queries:
            resp = http.get("/api/v1/query", params={"query": q})
            if resp.status_code != 200 or resp.json().get("status") != "success":
                bad.append((q, resp.text[:300]))
    assert bad == []


def test_dashboard_is_importable() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["__inputs"][0]["name"] == "DS_PROMETHEUS"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in doc["panels"] if p["type"] == "row"}
    assert {"Fleet overview", "Audit pipeline health"} <= titles
    assert any(t.startswith("Per pod") for t in titles)
    for p in doc["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
