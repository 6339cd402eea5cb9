"""Make the Prometheus Operator's copy of the alert rules from alerts.yml.

deploy/kustomize/components/monitoring/prometheusrule.yaml is a PrometheusRule whose spec is
alerts.yml's `groups:` block as written (its comments too), indented under `spec:`. alerts.yml
stays the one place rules are edited and tested (promtool, alerts_test.yml); run this after
editing it. tests/unit/test_deploy.py fails when the two disagree.

    python3 deploy/prometheus/prometheusrule.py          # rewrite the PrometheusRule
    python3 deploy/prometheus/prometheusrule.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALERTS = HERE / "alerts.yml"
TARGET = HERE.parent / "kustomize" / "components" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# Made by deploy/prometheus/prometheusrule.py from deploy/prometheus/alerts.yml: edit alerts.yml
# (and its promtool tests), then rerun the script; tests/unit/test_deploy.py fails when the two
# differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: vpnfleet-alerts
  namespace: vpnfleet
  labels:
    app.kubernetes.io/part-of: vpnfleet
spec:
"""


def render(alerts: str) -> str:
    """The PrometheusRule's text for the rule file `alerts`."""
    lines = alerts.splitlines()
    if "groups:" not in lines:
        raise ValueError("alerts.yml has no top-level 'groups:' line")
    body = lines[lines.index("groups:") :]
    return HEADER + "".join(f"  {line}\n" if line.strip() else "\n" for line in body)


def main(argv: list[str]) -> int:
    want = render(ALERTS.read_text())
    if argv == ["--check"]:
        if TARGET.exists() and TARGET.read_text() == want:
            return 0
        print(f"{TARGET} is out of date: run python3 {Path(__file__).name}", file=sys.stderr)
        return 1
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    TARGET.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
