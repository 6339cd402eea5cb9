#!/usr/bin/env bash
# The demo: installs what is missing, then starts the lab (control plane on SQLite, 2 OpenVPN
# pods behind a load balancer, 3 connected users, a backend service) on this machine.
# Needs root (network namespaces, iptables). Stop it with: .venv/bin/vpnfleet lab down
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
.venv/bin/vpnfleet lab down >/dev/null 2>&1 || true
.venv/bin/vpnfleet lab up "$@"
cat <<'TXT'

A short tour (all from this shell):
  .venv/bin/vpnfleet lab status                   # pods, readiness, live sessions
  .venv/bin/vpnfleet lab exec alice -- python3 -c "import urllib.request as u; print(u.urlopen('http://10.99.0.100:8080/').read().decode())"
                                                  # alice (NAT) is seen as her pod's address
  .venv/bin/vpnfleet lab exec gary -- python3 -c "import urllib.request as u; print(u.urlopen('http://10.99.0.100:8080/').read().decode())"
                                                  # gary (gateway mode) keeps his tunnel address
  export VPNFLEET_URL=https://10.99.254.2:8000 VPNFLEET_TOKEN_FILE=/var/lib/vpnfleet-lab/vfl/cp/admin-token
  .venv/bin/vpnfleet session list
  .venv/bin/vpnfleet lab exec alice -- python3 -c "import urllib.request as u; u.urlopen('http://10.99.0.100:8088/report')"
  .venv/bin/vpnfleet audit annotate --format nginx /var/lib/vpnfleet-lab/vfl/nginx/access.log
                                                  # nginx logged her pod's address; the audit names alice
  .venv/bin/vpnfleet console account add ada --role admin
                                                  # then sign in at https://10.99.254.2:8000/console/
                                                  # (the lab's own CA: the browser asks to accept it)
  .venv/bin/vpnfleet user disable bob             # bob is cut within a second
  .venv/bin/vpnfleet lab down                     # removes everything the lab made
TXT
